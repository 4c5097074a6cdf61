"""The ``umeml-server`` command (the federation coordinator)."""

from __future__ import annotations

import argparse
import sys

from umeml import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``umeml-server``."""
    parser = argparse.ArgumentParser(prog="umeml-server", description="umeml federation coordinator")
    parser.add_argument("--version", action="version", version=f"umeml {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``umeml-server`` console script."""
    build_parser().parse_args(argv)
    print("umeml-server: no command given; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``umeml-client``: the site-side command line (one subcommand per task)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from umeml import __version__
from umeml.client.extract.cli import add_extract_parser
from umeml.client.site_cli import add_site_parsers

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``umeml-client`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="umeml-client",
        description="umeml site tools: run at a hospital site on data that never leaves it.",
    )
    parser.add_argument("--version", action="version", version=f"umeml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_extract_parser(sub)
    add_site_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``umeml-client`` console script; returns the exit code."""
    from umeml.exitcodes import run_main

    return run_main(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

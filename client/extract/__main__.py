"""``python -m umeml.client.extract``: the same as ``umeml-client extract``."""

from __future__ import annotations

from .cli import build_parser, run_extract

if __name__ == "__main__":
    raise SystemExit(run_extract(build_parser().parse_args()))

"""``python -m umeml.flower.fleet_retry ARGS``: Flower's ``flower-supernode`` with a SuperLink's
HTTP 500 retried like its 502/503/504.

Flower 1.42's SuperNode speaks HTTP to the Fleet API and retries (unlimited, exponential backoff
capped at 20 s) only transport errors and 502/503/504. Under load the SuperLink's SQLite answers
"database is locked", which reaches the SuperNode as ``500 Internal Server Error``: the SuperNode
gave up and exited, and its site left the run for good (seen in the fault script). This module
adds 500 to the retried codes, then runs Flower's own entry point unchanged. It relies on the
module-level ``_RETRYABLE_STATUS_CODES`` of ``flwr.supercore.retry.http_retry``, read at each
failure; ``tests/test_resume_safety.py`` fails when an upgrade moves it.
"""

from __future__ import annotations

import sys

import httpx
from flwr.supercore.retry import http_retry

RETRIED_TOO = frozenset({httpx.codes.INTERNAL_SERVER_ERROR})


def retry_internal_errors() -> None:
    """Make this process's Fleet API client retry HTTP 500 (a transient SuperLink error)."""
    http_retry._RETRYABLE_STATUS_CODES = frozenset(http_retry._RETRYABLE_STATUS_CODES) | RETRIED_TOO


def main() -> None:
    """Run ``flower-supernode`` with the command line given, 500 retried."""
    from flwr.supernode.cli import flower_supernode

    retry_internal_errors()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()

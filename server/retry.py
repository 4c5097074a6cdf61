"""Transient SuperLink errors retried with backoff before they fail a run (gRPC status codes,
and HTTP 5xx: Flower 1.42's ServerApp speaks HTTP to the SuperLink's runtime API).

Flower 1.42's ServerApp retries a Grid call only when the SuperLink is unreachable (gRPC
``UNAVAILABLE``); an error the SuperLink returns, such as ``INTERNAL`` for SQLite's "database is
locked" under load, goes straight to the ServerApp and ended the whole run. :class:`RetryingGrid`
retries such calls with exponential backoff, logging each retry, and gives up (re-raising the
last error) only after ``budget`` seconds. Errors that say the run is over or the caller is not
allowed (``PERMISSION_DENIED``, ``UNAUTHENTICATED``, ``CANCELLED``) are never retried.

A retried ``push_messages`` may have delivered some messages before it failed: those are sent
again and their first replies are ignored (replies are matched to the message ids the successful
push returned), so a site may train twice in such a round but its update counts once.
"""

from __future__ import annotations

import logging
import time

import grpc
import httpx

log = logging.getLogger("umeml.server")

TRANSIENT = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.ABORTED})


def is_transient(err: BaseException) -> bool:
    """Whether a Grid call's error may pass if the call is repeated (gRPC codes above; over
    HTTP, which Flower 1.42's ServerApp uses, a 5xx status)."""
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code >= 500
    code = getattr(err, "code", None)
    if not isinstance(err, grpc.RpcError) or not callable(code):
        return False
    return code() in TRANSIENT


class RetryingGrid:
    """Delegates to a Flower Grid; its SuperLink calls are retried on transient errors."""

    RETRIED = ("push_messages", "pull_messages", "get_node_ids", "get_nodes")

    def __init__(self, grid, budget: float = 60.0, first_wait: float = 0.5, max_wait: float = 8.0):
        self._grid = grid
        self._budget, self._first_wait, self._max_wait = budget, first_wait, max_wait

    def __getattr__(self, name):
        attr = getattr(self._grid, name)
        if name not in self.RETRIED or not callable(attr):
            return attr
        return lambda *args, **kwargs: self._call(name, attr, args, kwargs)

    def _call(self, name, fn, args, kwargs):
        deadline = time.monotonic() + self._budget
        wait, tries = self._first_wait, 0
        while True:
            tries += 1
            try:
                return fn(*args, **kwargs)
            except (grpc.RpcError, httpx.HTTPStatusError) as err:
                if not is_transient(err) or time.monotonic() + wait > deadline:
                    if tries > 1:
                        log.error("SuperLink call %s failed %d times over %.0f s; giving up: %s", name, tries,
                                  self._budget, _describe(err))
                    raise
                log.warning("SuperLink call %s failed (%s); retry %d in %.1f s", name, _describe(err), tries, wait)
                time.sleep(wait)
                wait = min(wait * 2, self._max_wait)


def _describe(err: Exception) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}: {err.response.text[:200]}"
    details = err.details() if callable(getattr(err, "details", None)) else ""
    return f"{err.code().name}: {details}" if callable(getattr(err, "code", None)) else str(err)

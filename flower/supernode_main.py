"""Flower's SuperNode with its two hard-coded sleeps made settings (``python -m umeml.flower.supernode_main``).

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) sleeps 3 s whenever a poll of
the SuperLink finds no message, and checks every 0.5 s whether the ClientApp's reply is ready;
neither has a flag or an environment variable. A message therefore waits 1.5 s on average
before a site even sees it, and 0.25 s more before its reply leaves. This entry point runs
Flower's own ``flower-supernode`` (same arguments, same code) with those two sleeps read from

- ``UMEML_SUPERNODE_IDLE_POLL_S`` (default 1.0): the pause after an empty poll,
- ``UMEML_SUPERNODE_BUSY_POLL_S`` (default 0.25): that pause during a run, i.e. within
  ``BUSY_WINDOW_S`` (60 s) of the last message this node served: the next round's message comes
  within seconds then, and a site that finished early would otherwise wait 0.5 s on average per
  wave for it; at idle (no message for a minute) the node polls at the idle pause again, and
- ``UMEML_SUPERNODE_REPLY_POLL_S`` (default 0.05): the pause between checks for a reply.

It also retries an HTTP 500 from the SuperLink instead of exiting (:func:`tolerate_transient_500`):
a SQLite SuperLink on a busy machine answers 500 ("database is locked") now and then.

Only the installed Flower minor version it was written for is tuned
(:func:`umeml.flower.pins.polling_problems`); any other runs unchanged, with a warning.
"""

from __future__ import annotations

import os
import sys
import time

IDLE_ENV = "UMEML_SUPERNODE_IDLE_POLL_S"
BUSY_ENV = "UMEML_SUPERNODE_BUSY_POLL_S"
REPLY_ENV = "UMEML_SUPERNODE_REPLY_POLL_S"
DEFAULT_IDLE_POLL_S = 1.0
DEFAULT_BUSY_POLL_S = 0.25
DEFAULT_REPLY_POLL_S = 0.05
BUSY_WINDOW_S = 60.0  # this long after the last message served, a node counts as in a run
FLOWER_IDLE_SLEEP_S = 3  # what start_client_internal sleeps after an empty poll (flwr 1.42)
FLOWER_REPLY_SLEEP_S = 0.5  # what _push_messages sleeps between checks for a reply (flwr 1.42)
RETRIED_TOO = frozenset({500})  # added to Flower's retried HTTP codes (502/503/504)


def retry_internal_errors() -> None:
    """Make this process's Fleet API client retry HTTP 500 (a transient SuperLink error); relies
    on the module-level ``_RETRYABLE_STATUS_CODES`` of ``flwr.supercore.retry.http_retry``, read
    at each failure (tests/test_resume_safety.py fails when an upgrade moves it)."""
    from flwr.supercore.retry import http_retry

    http_retry._RETRYABLE_STATUS_CODES = frozenset(http_retry._RETRYABLE_STATUS_CODES) | RETRIED_TOO


def poll_setting(name: str, default: float) -> float:
    """A polling interval in seconds from the environment (ValueError naming the variable)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number of seconds") from None
    if not 0.01 <= value <= 60:
        raise ValueError(f"{name}={raw!r}: must be between 0.01 and 60 seconds")
    return value


class TunedTime:
    """Stands for the ``time`` module inside ``start_client_internal``: its two fixed sleeps take
    the configured intervals, every other use of ``time`` is the real module.

    Flower's loop waits for a ClientApp's reply with the 0.5 s sleep, so such a wait marks this
    node as serving a message; for ``BUSY_WINDOW_S`` afterwards an empty poll pauses ``busy``
    (at most ``idle``) instead of ``idle``."""

    def __init__(self, idle: float, reply: float, busy: float | None = None):
        self.idle = idle
        self.reply = reply
        self.busy = idle if busy is None else min(busy, idle)
        self.last_served = float("-inf")  # time.monotonic() of the last reply wait

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Flower's 3 s idle sleep becomes ``busy`` during a run and ``idle`` otherwise, its
        0.5 s reply wait ``reply``."""
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.busy if time.monotonic() - self.last_served < BUSY_WINDOW_S else self.idle
        elif seconds == FLOWER_REPLY_SLEEP_S:
            self.last_served = time.monotonic()
            seconds = self.reply
        time.sleep(seconds)


def tune_polling(idle: float, reply: float, busy: float | None = None) -> list[str]:
    """Install the intervals into Flower's SuperNode module; returns why it was not done (empty: done)."""
    from umeml.flower.pins import polling_problems
    from umeml.flower.pins import problems as pin_problems

    problems = pin_problems(polling_problems)
    if not problems:
        from flwr.supernode import start_client_internal

        start_client_internal.time = TunedTime(idle, reply, busy)
    return problems


def _tolerant(heartbeat_fn):
    """A node heartbeat that reports an HTTP 500 as a failed beat (retried by Flower's backoff)
    instead of raising, which would end the heartbeat thread and get the node declared dead."""
    import httpx

    def beat() -> bool:
        try:
            return heartbeat_fn()
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 500:
                return False
            raise

    return beat


def tolerate_transient_500() -> list[str]:
    """Make the SuperNode retry an HTTP 500 from the SuperLink (with Flower's own backoff) instead
    of exiting; returns why it was not done (empty: done).

    A SuperLink on SQLite answers 500 ("database is locked") when a write waits more than 5 s
    for the lock, which happens on a busy machine; the transaction was rolled back, so the same
    request can be sent again. Flower 1.42 retries 502/503/504 but exits on 500, taking the
    site out of the federation for the rest of the run.
    """
    from umeml.flower.pins import problems as pin_problems
    from umeml.flower.pins import retry_problems

    problems = pin_problems(retry_problems)
    if not problems:
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode import fleet_http_connection

        class TolerantHeartbeatSender(HeartbeatSender):
            def __init__(self, heartbeat_fn):
                super().__init__(_tolerant(heartbeat_fn))

        retry_internal_errors()
        fleet_http_connection.HeartbeatSender = TolerantHeartbeatSender
    return problems


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` with ``argv`` and the tuned polling."""
    idle = poll_setting(IDLE_ENV, DEFAULT_IDLE_POLL_S)
    reply = poll_setting(REPLY_ENV, DEFAULT_REPLY_POLL_S)
    busy = poll_setting(BUSY_ENV, DEFAULT_BUSY_POLL_S)
    problems = tune_polling(idle, reply, busy)
    from umeml.flower.pulls import fast_object_pulls

    slow = fast_object_pulls()  # pull a message's objects as soon as the ServerApp has uploaded them
    if slow:
        print("warning: object pulls keep Flower's backoff (1 s, 2 s, 4 s ...): " + "; ".join(slow),
              file=sys.stderr, flush=True)
    retry = tolerate_transient_500()
    if retry:
        print("warning: the SuperNode exits on an HTTP 500 from the SuperLink (Flower's default): " + "; ".join(retry),
              file=sys.stderr, flush=True)
    if problems:
        print("warning: SuperNode polling left at Flower's defaults (3 s idle, 0.5 s reply): " + "; ".join(problems),
              file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()

"""Flower's ``flwr-clientapp`` with the short object-pull backoff (``python -m umeml.flower.clientapp_main``,
same arguments): the resident site runtime's fallback.

While a site's resident runtime (:mod:`umeml.client.resident`) is starting or restarting, its
launcher hands each message to a process of Flower's own ``flwr-clientapp``
(:mod:`umeml.client.warm`). That process pulls its message from the SuperNode with Flower's
backoff, 1 s, 2 s, 4 s, 8 s, for objects that the SuperNode is still storing (up to 15 s per
message; :mod:`umeml.flower.pulls`). This entry point shortens that backoff in the process
(:func:`umeml.flower.pulls.fast_object_pulls`, before the pull: ``run_clientapp`` pulls the
message before it loads the ClientApp) and then runs Flower's own ``flwr-clientapp`` entry point,
unchanged otherwise. With a Flower other than the pinned minor version, or with
``UMEML_PULL_BACKOFF=flower``, Flower's backoff is kept, with a warning.
"""

from __future__ import annotations

import sys


def clientapp_command() -> list[str]:
    """The command that stands for ``flwr-clientapp`` (Flower's arguments are appended)."""
    return [sys.executable, "-m", "umeml.flower.clientapp_main"]


def main(argv: list[str] | None = None) -> None:
    """Run ``flwr-clientapp`` with ``argv`` and the short object-pull backoff."""
    from umeml.flower.pulls import fast_object_pulls

    slow = fast_object_pulls()
    if slow:
        print("warning: this ClientApp's object pulls keep Flower's backoff (1 s, 2 s, 4 s ...): " + "; ".join(slow),
              file=sys.stderr, flush=True)
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = ["flwr-clientapp", *(sys.argv[1:] if argv is None else argv)]
    flwr_clientapp()


if __name__ == "__main__":
    main()

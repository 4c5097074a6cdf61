"""Flower's ``flower-superexec`` for the SuperLink, retrying a transient HTTP 500
(``python -m umeml.flower.superexec_main``, same arguments).

The SuperLink runs ServerApps through a SuperExec process that asks its Runtime API for work every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (``flwr.supercore.superexec.run_superexec``). Its
HTTP client retries 502/503/504 and connection errors but gives up on a 500; the exception ends
the loop and the process. A SuperLink on SQLite answers 500 ("database is locked") when a write
waits more than 5 s for the lock, on a busy machine; after one such answer no ServerApp is
started any more, so a run submitted (or resumed) afterwards stays pending for ever. Flower 1.42
offers no setting for it; its ``--isolation process`` mode lets the coordinator start the
SuperExec itself (:meth:`umeml.server.deploy.SuperLink.start`), with this entry point, which
makes the same one change as the SuperNode, ServerApp and ClientApp shims
(:func:`umeml.flower.supernode_main.retry_internal_errors`: 500 added to Flower's retried codes,
with Flower's backoff) and then runs Flower's own ``flower-superexec``.

With a Flower other than the pinned minor version (:func:`umeml.flower.pins.superexec_problems`)
it runs Flower's SuperExec unchanged, with a warning.
"""

from __future__ import annotations

import sys


def superexec_command(runtime_address: str, parent_pid: int, root_certificates: str | None = None) -> list[str]:
    """The command line of the SuperLink's SuperExec: the one Flower 1.42's SuperLink starts in
    its default isolation mode (``_get_superexec_command``), run through this module."""
    tls = ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return [sys.executable, "-m", "umeml.flower.superexec_main", *tls, "--runtime-api-address", runtime_address,
            "--parent-pid", str(parent_pid)]


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-superexec`` with ``argv``, HTTP 500 from the SuperLink retried."""
    from umeml.flower.pins import problems, superexec_problems

    found = problems(superexec_problems)
    if found:
        print("warning: the SuperExec exits on an HTTP 500 from the SuperLink (Flower's default): "
              + "; ".join(found), file=sys.stderr, flush=True)
    else:
        from umeml.flower.supernode_main import retry_internal_errors

        retry_internal_errors()
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    main()

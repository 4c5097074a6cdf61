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

The ServerApps it launches run through the same change: Flower's ``flwr-serverapp`` pulls its
task (run, app bundle, context) and starts its task heartbeat before it loads umeml's ServerApp
(whose import applies the setting), so a 500 there failed the run. This SuperExec puts a
``flwr-serverapp`` of its own first on its ``PATH`` (:func:`serverapp_shim`; the SuperExec
launches the command by that name), which runs :func:`serverapp_main`: the 500 retried, the task
heartbeat counting a 500 as a failed beat (retried) instead of ending, then Flower's own
``flwr-serverapp``.

With a Flower other than the pinned minor version (:func:`umeml.flower.pins.superexec_problems`)
it runs Flower's SuperExec unchanged, with a warning.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SERVERAPP = '''#!{python}
"""flwr-serverapp of umeml's SuperExec (written by umeml.flower.superexec_main): Flower's own, HTTP 500 retried."""
from umeml.flower.superexec_main import serverapp_main

serverapp_main()
'''


def superexec_command(runtime_address: str, parent_pid: int, root_certificates: str | None = None) -> list[str]:
    """The command line of the SuperLink's SuperExec: the one Flower 1.42's SuperLink starts in
    its default isolation mode (``_get_superexec_command``), run through this module."""
    tls = ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return [sys.executable, "-m", "umeml.flower.superexec_main", *tls, "--runtime-api-address", runtime_address,
            "--parent-pid", str(parent_pid)]


def serverapp_shim(folder: Path) -> Path:
    """Write the ``flwr-serverapp`` this SuperExec launches into ``folder`` and put ``folder`` first
    on this process's ``PATH`` (the ServerApp processes it starts inherit it); returns the script."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-serverapp"
    script.write_text(SERVERAPP.format(python=sys.executable))
    script.chmod(0o700)
    os.environ["PATH"] = str(folder) + os.pathsep + os.environ.get("PATH", "")
    return script


def serverapp_main(argv: list[str] | None = None) -> None:
    """Run Flower's ``flwr-serverapp`` with ``argv``: HTTP 500 from the SuperLink retried, its
    task heartbeat tolerating a 500 (a failed beat, retried) instead of stopping."""
    import importlib

    from umeml.flower.supernode_main import _tolerant, retry_internal_errors

    retry_internal_errors()
    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the package exports the function
    heartbeat_fn = run_serverapp.make_task_heartbeat_fn_http
    if not getattr(heartbeat_fn, "umeml_tolerant", False):
        def tolerant_heartbeat_fn(client):
            return _tolerant(heartbeat_fn(client))

        tolerant_heartbeat_fn.umeml_tolerant = True
        run_serverapp.make_task_heartbeat_fn_http = tolerant_heartbeat_fn
    from flwr.superlink.cli import flwr_serverapp

    sys.argv = ["flwr-serverapp", *(sys.argv[1:] if argv is None else argv)]
    flwr_serverapp()


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
        home = os.environ.get("FLWR_HOME") or tempfile.mkdtemp(prefix="umeml-superexec-")
        serverapp_shim(Path(home) / "umeml-bin")
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    main()

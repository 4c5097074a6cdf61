"""The warm site runtime: one resident process per site that serves every ClientApp message.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message
(``SubprocessExecutor.launch``: ``flwr-clientapp --runtime-api-address ADDR --token TOKEN ...``),
and each such process imports flwr, torch and umeml and reads the site's cohort again before it
pulls its one message. ``umeml-client start`` puts a small ``flwr-clientapp`` of its own first
on the SuperNode's ``PATH`` (:mod:`umeml.client.warm`); it hands the command line it was given,
token included, over a private Unix socket to this process, which has imported everything and
loaded and validated the cohort once. This process then does what Flower's ``flwr-clientapp``
does with the token (``flwr.supernode.runtime.run_clientapp``): pull the message and its context
from the SuperNode's Runtime API, run the umeml ClientApp, push the reply and the task's status,
with Flower's own helpers, and stays for the next message, the next round and the next run.

Messages run one at a time, in arrival order (a SuperNode delivers one message at a time). The
cohort is reloaded when its files change (fingerprint checked per message,
``umeml.client.app._cohort``). The runtime relies on details of Flower 1.42 that
:mod:`umeml.flower.pins` checks; with another Flower it refuses to start and every message runs
in Flower's own process.

    python -m umeml.client.resident --socket PATH --site SITE.yaml [--config EXPERIMENT.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from umeml.errors import UmemlError

log = logging.getLogger("umeml.site.resident")

READY = "resident runtime ready"  # the line the supervisor and the tests look for in the log
EXIT_FLOWER_MISMATCH = 3  # the installed Flower is not the one the runtime is pinned to
MESSAGE_PULL_MAX_S = 120.0  # the longest a message's pull from the local SuperNode may take
# a pull that has received no object for this long gives up as soon as another message waits
STALLED_PULL_S = 30.0


class Refused(UmemlError):
    """A hand-over the resident runtime cannot serve; the launcher runs Flower's own process."""


def parse_launch(argv: list[str]):
    """The ``flwr-clientapp`` arguments the SuperExec passed, read by Flower's own parser:
    (Runtime API address, token, insecure, root certificates bytes or None)."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    try:
        args = _parse_args_run_flwr_clientapp().parse_args(argv)
        token = try_obtain_flwr_app_token(args)
    except SystemExit as err:  # argparse and Flower's token reader exit on bad input
        raise Refused(f"unreadable flwr-clientapp arguments ({err})") from None
    if getattr(args, "runtime_dependency_install", False):
        raise Refused("runtime dependency installation needs a process of its own")
    certs = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    return args.runtime_api_address, token, bool(args.insecure), certs


class AppCache:
    """The ClientApp of each app bundle (by FAB hash): installed and imported once per process."""

    def __init__(self):
        self._apps: dict[str, object] = {}

    def get(self, run, fab):
        """The ClientApp of ``fab`` (Flower's installer and loader, as ``flwr-clientapp`` uses them)."""
        app = self._apps.get(fab.hash_str)
        if app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = self._apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return app


def task_retry(retry):
    """Flower's HTTP retry invoker for one task served by the resident: unchanged, except that an
    HTTP 401 (the SuperNode no longer knows the task's token) ends the call with that error.
    Flower's answers a 401 by sending SIGINT to its own process (right for ``flwr-clientapp``, one
    task per process); in the resident that SIGINT ended the runtime and every later task (the
    fault script: a pull that outlived a SuperLink restart came back 401, and the supervisor had
    to start the resident again). Here the task fails and the runtime serves the next one."""
    import httpx

    flower_giveup = retry.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return flower_giveup(exc)

    retry.should_giveup = should_giveup
    return retry


def _runtime_client(address: str, token: str, insecure: bool, certs):
    """A Runtime API client authenticated with the task's token, as ``run_clientapp`` builds it."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    retry = task_retry(make_simple_http_retry_invoker())
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certs,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    return client, retry


def task_heartbeat_fn(client) -> Callable[[], bool]:
    """The heartbeat of one task served by the resident: Flower's ``make_task_heartbeat_fn_http``
    except when the task is gone. Flower's raises SIGINT in the process when the SuperNode answers
    that the task is no longer valid (right for ``flwr-clientapp``, one task per process); in the
    resident that SIGINT ended the runtime and every later task (seen when a pull timed out during
    a SuperLink restart: the failed task's last beat came back "not valid"). Here a task that is
    gone (that answer, or 401/404: its token no longer known) only silences this task's beats;
    503/504 and transport errors are failed beats to retry, as in Flower; other statuses raise."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request, gone = SendTaskHeartbeatRequest(), threading.Event()

    def beat() -> bool:
        if gone.is_set():
            return True  # nothing left to keep alive; the task's sender stops when serve_task ends
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            code = err.response.status_code
            if code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            if code in (httpx.codes.UNAUTHORIZED, httpx.codes.NOT_FOUND):
                gone.set()
                return True
            raise
        if not res.success:
            log.warning("the SuperNode no longer knows this task; its heartbeat stops (the runtime goes on)")
            gone.set()
        return True

    return beat


class StalledPullGuard:
    """A task's Runtime API client whose object pulls give up on a message that has stalled
    while another message waits (every other call is the client's own).

    When the SuperLink dies while the SuperNode fetches a message's objects, they never arrive:
    the SuperNode answers "unavailable" until :data:`MESSAGE_PULL_MAX_S`, and this one-at-a-time
    runtime held back the resumed run's messages behind it (the fault script: a pull of the dead
    run's message took 120 s, the resume waited on it). A pull that has received no object for
    ``stall_s`` seconds while ``others_waiting()`` fails at its next attempt instead (Flower's
    ``ObjectPullError``, which ends the pull); alone in the queue it keeps Flower's patience, so a
    slow but live transfer is never cut short by the clock alone."""

    def __init__(self, client, others_waiting: Callable[[], bool], stall_s: float = STALLED_PULL_S):
        self._client, self._others_waiting, self._stall_s = client, others_waiting, float(stall_s)
        self._last_object = time.monotonic()

    def __getattr__(self, name):
        return getattr(self._client, name)

    def PullObject(self, request):  # noqa: N802 - Flower's RuntimeHttpClient method name
        """Flower's ``PullObject``, refused once the pull has stalled and another message waits."""
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

        stalled = time.monotonic() - self._last_object
        if stalled > self._stall_s and self._others_waiting():
            raise ObjectPullError(request.object_id, f"no object for {stalled:.0f} s and another message is "
                                  "waiting (the message's SuperLink is probably gone)")
        response = self._client.PullObject(request)
        if response.object_found and response.object_available:
            self._last_object = time.monotonic()
        return response


def serve_task(address: str, token: str, insecure: bool, certs, apps: AppCache,
               others_waiting: Callable[[], bool] = lambda: False) -> str:
    """Serve the one message behind ``token``: pull it, run the ClientApp, push the reply and the
    task's final status, as Flower's ``run_clientapp`` does. ``others_waiting``: whether another
    message waits behind this one (:class:`StalledPullGuard`). Returns a line for the log."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client, retry = _runtime_client(address, token, insecure, certs)
    heartbeat = HeartbeatSender(task_heartbeat_fn(client))
    message = context = reply = None
    status, details, what = SubStatus.FAILED, "ClientApp task failed due to unknown reason", "?"
    t = [time.perf_counter()]  # start, message pulled, ClientApp done, reply pushed (the log line's split)
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(StalledPullGuard(client, others_waiting))
        t.append(time.perf_counter())
        what = f"{message.metadata.message_type} (run {run.run_id})"
        reply = apps.get(run, fab)(message=message, context=context)
        t.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: the failure becomes the error reply
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = str(type(ex)) + ":<'" + str(ex) + "'>"
        log.error("the ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            retry.max_tries = 1  # as flwr-clientapp's exit handler: do not block on the status push
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:  # a status push that fails (the task gone) must not leave the beats running
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
    t.append(time.perf_counter())
    split = ", ".join(f"{name} {b - a:.2f} s" for name, a, b in zip(("pull", "ClientApp", "push"), t, t[1:]))
    return f"served {what} in {t[-1] - t[0]:.2f} s ({split}): {status}"


def _worker(tasks: queue.Queue, apps: AppCache) -> None:
    """Serve handed-over tasks one at a time (one message per SuperNode at a time), once the
    first-use imports are done (a task handed over meanwhile waits in the queue)."""
    warm_imports()
    while True:
        launch = tasks.get()
        try:
            log.info("%s (pid %d)", serve_task(*launch, apps, others_waiting=lambda: not tasks.empty()), os.getpid())
        except Exception:  # noqa: BLE001 - one failed hand-over must not end the site's runtime
            log.exception("serving a message failed")


def _accept(server: socket.socket, tasks: queue.Queue) -> None:
    """Answer each launcher: ``accepted`` (the task is queued) or ``refused: why``."""
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            try:
                argv = json.loads(conn.makefile("rb").readline())["argv"]
                tasks.put(parse_launch([str(a) for a in argv]))
                conn.sendall(b"accepted\n")
            except (Refused, ValueError, KeyError, TypeError) as err:
                log.warning("hand-over refused, Flower's own flwr-clientapp serves this message: %s", err)
                conn.sendall(f"refused: {err}\n".encode())
            except OSError as err:
                log.warning("hand-over failed: %s", err)


def warm_imports() -> None:
    """Import what the first messages would import on first use (metrics, accountants, torch's
    optimizers: seconds inside the first round otherwise). The worker does it before serving,
    after the runtime is ready, so that a restarted runtime takes messages back as soon as it has
    its cohort."""
    import torch

    from umeml.lazy import import_now

    import_now()
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # its first use imports torch._dynamo (~5 s)


def warm_up(site_file: Path, experiment: Path | None) -> str:
    """Import the ClientApp (torch, umeml) and load and validate the site's cohort with the
    experiment's data section and tasks (the defaults without one), as the messages will read it."""
    from umeml.client import app as client_app
    from umeml.config import ExperimentConfig, load_config, load_site_config

    site = load_site_config(str(site_file))
    cfg = load_config(experiment) if experiment is not None else ExperimentConfig()
    tasks = cfg.tasks if experiment is not None else None  # the cohort cache's key, as a message has it
    cohort = client_app._cohort(site.cohort_source, client_app._data_json(cfg), tasks)
    return f"site {site.site_id}: {len(cohort)} patients"


def _watch_parent(parent: int) -> None:
    """Leave when the ``umeml-client start`` process that started us is gone (even SIGKILLed)."""
    while os.getppid() == parent:
        time.sleep(2.0)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the resident runtime process (started by ``umeml-client start``)."""
    ap = argparse.ArgumentParser(prog="python -m umeml.client.resident", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--site", required=True, type=Path)
    ap.add_argument("--config", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    from umeml.flower.pins import contract_problems

    problems = contract_problems()  # the pinned Flower version and everything the runtime relies on
    if problems:
        log.error("not starting: %s", "; ".join(problems))
        return EXIT_FLOWER_MISMATCH
    from umeml.flower.pulls import fast_object_pulls

    # a message's objects are pulled as soon as the SuperNode has them, and given up after
    # MESSAGE_PULL_MAX_S (the SuperNode fetches them from the SuperLink first; one that never
    # arrives would block every later message of this one-at-a-time runtime); the version was
    # checked just above
    slow = fast_object_pulls(MESSAGE_PULL_MAX_S, version_checked=True)
    if slow:
        log.warning("object pulls keep Flower's 1 s+ backoff: %s", "; ".join(slow))
    t0 = time.perf_counter()
    loaded = warm_up(args.site, args.config)
    tasks: queue.Queue = queue.Queue()
    threading.Thread(target=_worker, args=(tasks, AppCache()), daemon=True).start()
    args.socket.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # only this user may hand tokens over
    try:
        server.bind(str(args.socket))
    finally:
        os.umask(old)
    server.listen(8)
    log.info("%s (pid %d, %s, warm-up %.1f s)", READY, os.getpid(), loaded, time.perf_counter() - t0)
    try:
        _accept(server, tasks)
    finally:
        server.close()
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

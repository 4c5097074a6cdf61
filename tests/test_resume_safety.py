"""Resume and restart that cannot go wrong: recorded roles, the run dir's lock, orphans of a
killed coordinator, the watchdog, impossible settings, transient SuperLink errors (fast tier: no
Flower process starts, except in the one slow test of the SuperLink's SuperExec)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from umeml.flower.processes import flower_env, port_is_free, processes_with_env, start_watchdog, stop_watchdog
from umeml.rundir import RunDir, RunDirError, SiteRoles, read_roles, write_roles
from umeml.server.cli import build_parser, preflight_start
from umeml.server.cli import main as server_main
from umeml.server.retry import RetryingGrid, is_transient
from umeml.server.runlock import CoordinatorLock, RunDirBusy, RunGuard, find_orphans, handle_orphans

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _fake_flower_process(files: RunDir, new_session: bool = True) -> subprocess.Popen:
    """A process with the run's FLWR_HOME, as Flower's SuperLink / SuperExec / ServerApp have."""
    return subprocess.Popen(SLEEPER, env=flower_env(files.flower_state), start_new_session=new_session)


def _gone(proc: subprocess.Popen, timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_roles_record_round_trip_and_refuse_a_change(tmp_path):
    files = RunDir(tmp_path)
    assert read_roles(files) is None
    write_roles(files, SiteRoles(("A2",), ("A0", "A1")))
    assert read_roles(files) == SiteRoles(("A2",), ("A0", "A1"))
    with pytest.raises(RunDirError, match="refusing to change"):
        write_roles(files, SiteRoles(("A1",), ("A0", "A2")))
    write_roles(files, SiteRoles(("A1",), ("A0", "A2")), replace=True)  # a new run over an old folder
    files.roles.write_text('{"held_out": "A1", "training": []}')
    with pytest.raises(RunDirError, match="held_out must be a list"):
        read_roles(files)


def _start_args(*argv: str):
    return build_parser().parse_args(["start", *argv])


def test_resume_takes_the_recorded_held_out_sites_and_refuses_others(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("split: {test_sites: [A0]}\n")  # the config says A0; the run held out A2
    write_roles(RunDir(run), SiteRoles(("A2",), ("A0", "A1")))
    plan, problems = preflight_start(_start_args("--sites", "3", "--resume", str(run)))
    assert problems == [] and plan.held_out == ("A2",)
    plan, problems = preflight_start(_start_args("--sites", "3", "--resume", str(run), "--held-out", "A2"))
    assert plan.held_out == ("A2",)
    rc = server_main(["start", "--sites", "3", "--resume", str(run), "--held-out", "A1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--held-out A1: {run} holds out A2" in err


def test_a_deployment_that_would_hold_out_every_site_is_a_usage_error(tmp_path, capsys):
    # the coordinator holds out split.n_test_sites of the joined sites (default 1): with --sites 1
    # no site would train; said before anything starts, not after the site joined
    (tmp_path / "exp.yaml").write_text("federation: {rounds: 1}\n")
    rc = server_main(["start", "--config", str(tmp_path / "exp.yaml"), "--sites", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "split.n_test_sites 1 of --sites 1: no site would be left to train" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "none.yaml").write_text("split: {n_test_sites: 0}\n")
    for config, sites in (("exp.yaml", "2"), ("none.yaml", "1")):
        plan, problems = preflight_start(_start_args("--config", str(tmp_path / config), "--sites", sites,
                                                     "--out", str(tmp_path / "run")))
        assert problems == [], config


def test_impossible_settings_are_usage_errors(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text("federation: {rounds: 1}\n")
    rc = server_main(["start", "--config", str(tmp_path / "exp.yaml"), "--sites", "0", "--port", "0",
                      "--wait-timeout", "0", "--rounds", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "4 problems" in err and "--sites 0" in err and "--port 0" in err
    assert not (tmp_path / "run").exists()
    rc = server_main(["simulate", "--config", str(tmp_path / "exp.yaml"), "--sites", "0", "--out", str(tmp_path / "s")])
    assert rc == 2 and "--sites 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_lock_refuses_a_live_coordinator_and_not_a_dead_one(tmp_path):
    files = RunDir(tmp_path)
    lock = CoordinatorLock(files).acquire()
    assert json.loads(files.lock.read_text())["coordinator_pid"] == os.getpid()
    # another process holding the same run dir: refused, naming our pid
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from umeml.rundir import RunDir; from umeml.server.runlock import CoordinatorLock, RunDirBusy\n"
        f"try: CoordinatorLock(RunDir({str(tmp_path)!r})).acquire()\n"
        "except RunDirBusy as e: print(e); sys.exit(3)")], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 3 and f"process id {os.getpid()}" in probe.stdout
    lock.release()
    assert not files.lock.exists()
    # a coordinator killed with SIGKILL leaves its lock file, but the kernel dropped its flock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from umeml.rundir import RunDir; from umeml.server.runlock import CoordinatorLock\n"
        f"CoordinatorLock(RunDir({str(tmp_path)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=str(holder.pid)):
        CoordinatorLock(files).acquire()
    holder.kill()
    holder.wait()
    assert files.lock.exists()
    CoordinatorLock(files).acquire().release()


def test_orphans_are_refused_or_stopped_with_force(tmp_path):
    files = RunDir(tmp_path / "run")
    other = _fake_flower_process(RunDir(tmp_path / "other"))  # another run's process is no orphan of this one
    orphan = _fake_flower_process(files)
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in find_orphans(files) and time.monotonic() < deadline:
            time.sleep(0.05)  # the environment is readable once the child has exec'd
        assert list(find_orphans(files)) == [orphan.pid]
        with pytest.raises(RunDirBusy, match=f"pid {orphan.pid}"):
            handle_orphans(files, force=False, printer=lambda s: None)
        assert orphan.poll() is None
        said = []
        handle_orphans(files, force=True, printer=said.append, grace=5)
        assert _gone(orphan, 5) and "--force: stopping 1" in said[0]
        assert other.poll() is None
    finally:
        for p in (orphan, other):
            p.kill()
            p.wait()


def test_watchdog_stops_the_runs_processes_when_the_coordinator_is_killed(tmp_path):
    """A coordinator SIGKILLed with its whole process group: the watchdog, in a session of its
    own, stops the Flower processes of its run, which live in sessions of their own."""
    files = RunDir(tmp_path / "run")
    script = (
        "import subprocess, sys, time\n"
        "from umeml.flower.processes import flower_env\n"
        "from umeml.rundir import RunDir\n"
        "from umeml.server.runlock import RunGuard\n"
        f"files = RunDir({str(files.root)!r})\n"
        "guard = RunGuard(files).__enter__()\n"
        f"p = subprocess.Popen({SLEEPER!r}, env=flower_env(files.flower_state), start_new_session=True)\n"
        "print(p.pid, flush=True); time.sleep(120)\n")
    coordinator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
    flower_pid = int(coordinator.stdout.readline())
    home = str(files.flower_state.resolve())
    assert flower_pid in processes_with_env("FLWR_HOME", home)
    os.killpg(coordinator.pid, signal.SIGKILL)
    coordinator.wait()
    deadline = time.monotonic() + 15
    while processes_with_env("FLWR_HOME", home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with_env("FLWR_HOME", home) == []
    # the next coordinator takes the run dir: the lock is free and no orphan is left
    with RunGuard(files, printer=lambda s: None):
        pass
    assert not files.lock.exists()


def test_watchdog_normal_end_stops_leftovers(tmp_path):
    files = RunDir(tmp_path)
    dog = start_watchdog(files.flower_state, grace=5)
    leftover = _fake_flower_process(files)
    time.sleep(0.3)
    stop_watchdog(dog)
    assert dog.returncode == 0 and _gone(leftover, 5)


def test_superlink_refuses_a_taken_port(tmp_path):
    import socket

    from umeml.server.deploy import SuperLink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        link = SuperLink("127.0.0.1", port, tmp_path / "flower", tmp_path / "superlink.log")
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            link.start()
    assert link.proc is None


def test_die_with_parent_is_set_on_linux(tmp_path):
    """The SuperLink gets SIGTERM from the kernel when the coordinator dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = ("import subprocess, sys\nfrom umeml.flower.processes import die_with_parent\n"
              f"p = subprocess.Popen({SLEEPER!r}, preexec_fn=die_with_parent, start_new_session=True)\n"
              "print(p.pid, flush=True)\nimport time; time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}/status").exists() else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.05)
    status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}/status").exists() else ""
    assert not status or "State:\tZ" in status


class _RpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _FlakyGrid:
    """Fails its first ``failures`` calls with ``code``, as a SuperLink under load does."""

    def __init__(self, failures: int, code=grpc.StatusCode.INTERNAL):
        self.failures, self.code, self.calls = failures, code, 0

    def get_node_ids(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise _RpcError(self.code, "sqlite3.OperationalError: database is locked")
        return [7]


def test_transient_superlink_errors_are_retried_with_backoff(caplog):
    grid = _FlakyGrid(failures=3)
    assert RetryingGrid(grid, budget=5, first_wait=0.01).get_node_ids() == [7]
    assert grid.calls == 4
    assert "database is locked" in caplog.text and "retry 3" in caplog.text
    # Flower 1.42's ServerApp speaks HTTP: a 500 is transient too, a 401 is not
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/pull-messages")
    assert is_transient(httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request)))
    assert not is_transient(httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request)))
    # a refusal is not retried, and a lasting failure ends after the budget
    denied = _FlakyGrid(failures=1, code=grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(grpc.RpcError):
        RetryingGrid(denied, budget=5, first_wait=0.01).get_node_ids()
    assert denied.calls == 1
    lasting = _FlakyGrid(failures=10**6)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError):
        RetryingGrid(lasting, budget=0.3, first_wait=0.01, max_wait=0.05).get_node_ids()
    assert lasting.calls > 3 and time.monotonic() - t0 < 2


def test_refused_site_records_the_reason_and_its_watcher_fires(tmp_path):
    from umeml.client.refusal import REFUSED_FILE, record_refusal, watch_refusal

    (tmp_path / REFUSED_FILE).write_text('{"reason": "stale, from an earlier run"}')
    seen = []
    stop = watch_refusal(tmp_path, seen.append, poll=0.05)
    time.sleep(0.2)
    assert seen == []  # a stale refusal does not stop a new start
    record_refusal(str(tmp_path), "A1", "node 7 authenticated with the key registered as 'A2'")
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert seen == ["node 7 authenticated with the key registered as 'A2'"]


def test_node_unavailable_replies_are_attributed_to_the_dead_node():
    """Flower 1.42 sends "Node Unavailable" from the SuperLink (node 1); the coordinator's grid
    names the node the message was for, so logs and metrics.csv name the site that died."""
    import flwr
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message

    from umeml.server.grid import SUPERLINK_NODE_ID as PINNED
    from umeml.server.grid import FastPollGrid

    assert flwr.__version__.startswith("1.42.") and PINNED == SUPERLINK_NODE_ID

    class DeadNodeGrid:
        def push_messages(self, messages):
            return ["m1"]

        def pull_messages(self, ids):
            return [create_message_error_unavailable_ins_message("m1", 1)]

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp
    msg = Message(RecordDict(), dst_node_id=4711, message_type="train")
    (reply,) = FastPollGrid(DeadNodeGrid()).send_and_receive([msg], timeout=5)
    assert reply.has_error() and reply.metadata.src_node_id == 4711


def test_supernode_shim_retries_http_500():
    """The SuperNode shim makes Flower's Fleet client retry a SuperLink's 500 ("database is
    locked"); fails when a Flower upgrade moves what the shim patches."""
    import flwr
    import httpx
    from flwr.supercore.retry import http_retry

    from umeml.flower.supernode import supernode_command
    from umeml.flower.supernode_main import retry_internal_errors

    assert flwr.__version__.startswith("1.42.")
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/fleet/pull-messages")
    error = httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
    from umeml.flower.supernode_main import RETRIED_TOO

    before = http_retry._RETRYABLE_STATUS_CODES
    try:
        http_retry._RETRYABLE_STATUS_CODES = frozenset(before) - RETRIED_TOO  # Flower's own (umeml.*.app patch it)
        assert http_retry.make_simple_http_retry_invoker().should_giveup(error) is True
        retry_internal_errors()
        assert http_retry.make_simple_http_retry_invoker().should_giveup(error) is False
    finally:
        http_retry._RETRYABLE_STATUS_CODES = before
    cmd = supernode_command("127.0.0.1:9092", 9094, Path("site.yaml"))
    assert cmd[1:3] == ["-m", "umeml.flower.supernode_main"]


def _fake_runtime_api(failures: int):
    """A Runtime API on 127.0.0.1 that answers HTTP 500 ("database is locked", as a SQLite
    SuperLink under load) ``failures`` times to the SuperExec's AcquireTask, then hands out one
    ServerApp task, then none; and to the ServerApp's PullTaskInput ``failures`` 500s, then 403
    (the run is no longer running: the ServerApp leaves). Returns the server and the paths asked."""
    import http.server
    import threading

    from flwr.proto.runtime_pb2 import AcquireTaskResponse, SendTaskHeartbeatResponse  # pylint: disable=E0611
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    asked: list[str] = []
    task = AcquireTaskResponse(task=Task(task_id=7, type=TaskType.SERVER_APP.value, run_id=1), token="tok-7")
    locked = b'{"detail": "sqlite3.OperationalError: database is locked"}'

    def answer(path: str) -> tuple[int, bytes]:
        n = asked.count(path)
        if path.endswith(("/acquire-task", "/pull-task-input")) and n <= failures:
            return 500, locked
        if path.endswith("/acquire-task"):
            return 200, task.SerializeToString() if n == failures + 1 else b""
        if path.endswith("/pull-task-input"):
            return 403, b"{}"
        if path.endswith("/send-task-heartbeat"):
            return 200, SendTaskHeartbeatResponse(success=True).SerializeToString()
        return 200, b""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("content-length", 0)))
            asked.append(self.path)
            code, body = answer(self.path)
            self.send_response(code)
            self.send_header("content-type", "application/protobuf" if code == 200 else "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, asked


def _superexec_after_500s(tmp_path: Path, command: list[str], failures: int = 2) -> tuple[list[str], str]:
    """The Runtime API paths asked while the SuperExec started by ``command`` meets ``failures``
    500s (and the ServerApp it launches as many), until that ServerApp pulled its task past them,
    the SuperExec exited or 90 s passed; and the SuperExec's output."""
    from umeml.flower.superexec_main import superexec_command

    server, asked = _fake_runtime_api(failures)
    args = superexec_command(f"127.0.0.1:{server.server_port}", os.getpid())[3:]
    proc = subprocess.Popen([*command, *args], env=flower_env(tmp_path / "flower"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90  # Flower's backoff: 1 s, then 2 s (full jitter), in both processes
        while time.monotonic() < deadline and asked.count("/v1/runtime/pull-task-input") <= failures \
                and proc.poll() is None:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        server.shutdown()
    return list(asked), out


@pytest.mark.slow  # starts Flower's SuperExec twice and a ServerApp (seconds each)
def test_the_superlinks_superexec_and_serverapp_survive_a_transient_http_500(tmp_path):
    """The SuperExec that starts the SuperLink's ServerApps exits on one HTTP 500 from the
    SuperLink in Flower 1.42 (no ServerApp starts again: a submitted or resumed run stays
    pending), and a ServerApp's task pull, before umeml's ServerApp is loaded, fails on one too;
    umeml's SuperExec retries with Flower's backoff, launches the ServerApp, whose pull retries."""
    flower = str(Path(sys.executable).parent / "flower-superexec")
    asked, out = _superexec_after_500s(tmp_path / "flower", [flower])
    assert asked == ["/v1/runtime/acquire-task"] and "500" in out, (asked, out)  # gone after the first 500
    asked, out = _superexec_after_500s(tmp_path / "umeml", [sys.executable, "-m", "umeml.flower.superexec_main"])
    assert asked.count("/v1/runtime/acquire-task") >= 3 and asked.count("/v1/runtime/pull-task-input") == 3, (asked, out)
    assert "Connection attempt failed, retrying" in out and "warning" not in out, out
    assert (tmp_path / "umeml" / "flower" / "umeml-bin" / "flwr-serverapp").exists()

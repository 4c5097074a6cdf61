"""The warm site runtime's in-process parts: the cohort kept across messages and reloaded when its
files change (the fingerprint is checked per message), and the supervisor's restart."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest

from umeml.client import app as client_app
from umeml.config import ExperimentConfig
from umeml.data.fingerprint import cohort_fingerprint
from umeml.data.source import CohortSource


def test_cohort_is_loaded_once_and_reloaded_when_a_file_changes(tiny_cohort_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort_dir, data)
    source, data_json = CohortSource(data_dir=str(data)), client_app._data_json(ExperimentConfig())
    first = client_app._cohort(source, data_json)
    assert client_app._cohort(source, data_json) is first  # the same object: nothing read again
    bag = sorted((data / "bags").iterdir())[0]
    before = cohort_fingerprint(source)
    os.utime(bag, ns=(time.time_ns(), time.time_ns() + 10**9))  # a bag rewritten in place
    assert cohort_fingerprint(source) != before
    second = client_app._cohort(source, data_json)
    assert second is not first and len(second) == len(first)
    table = data / "table.csv"
    table.write_text(table.read_text() + "\n")  # the table rewritten (one byte longer)
    third = client_app._cohort(source, data_json)
    assert third is not second and client_app._cohort(source, data_json) is third


def test_warm_up_imports_what_the_first_messages_use_and_caches_the_cohort_as_they_read_it(
        tiny_cohort_dir, tmp_path, monkeypatch):
    # the first train message paid ~5 s for torch._dynamo (torch.optim's first use) and the first
    # validation ~3 s for scipy.stats and lifelines; the handshake read the cohort again (its
    # cache key has the experiment's tasks, the warm-up's had none)
    import queue

    import torch

    import umeml.lazy
    from umeml.client import resident
    from umeml.config import load_config

    imported, optimizers = [], []
    monkeypatch.setattr(client_app, "_COHORTS", {})  # nothing cached by earlier tests
    monkeypatch.setattr(umeml.lazy, "import_now", lambda: imported.append(umeml.lazy.FIRST_USE))
    monkeypatch.setattr(torch.optim, "SGD", lambda *a, **kw: optimizers.append(a))

    class Done(Exception):
        pass

    class Tasks(queue.Queue):
        def get(self, *a, **kw):  # the worker asks for its first task: imports must be done
            assert imported and optimizers
            raise Done

    with pytest.raises(Done):
        resident._worker(Tasks(), resident.AppCache())
    assert imported == [("scipy.stats", "lifelines.utils", "opacus.accountants")] and len(optimizers) == 1
    (tmp_path / "site.yaml").write_text(f"site_id: A0\ndata_dir: {tiny_cohort_dir}\ndevice: cpu\n")
    (tmp_path / "exp.yaml").write_text("tasks: [grade, survival]\ndata: {max_patches: 16}\n")
    assert "60 patients" in resident.warm_up(tmp_path / "site.yaml", tmp_path / "exp.yaml")
    cfg = load_config(tmp_path / "exp.yaml")
    monkeypatch.setattr(CohortSource, "load", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("read again")))
    client_app._cohort(CohortSource(data_dir=str(tiny_cohort_dir)), client_app._data_json(cfg), cfg.tasks)


def test_import_now_names_what_is_not_installed():
    from umeml.lazy import import_now

    assert import_now(("json", "no_such_module_umeml")) == ["no_such_module_umeml"]


def test_fingerprint_sees_added_and_removed_files(tiny_cohort_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort_dir, data)
    source = CohortSource(data_dir=str(data))
    a = cohort_fingerprint(source)
    assert cohort_fingerprint(source) == a
    (data / "bags" / "extra.h5").write_bytes(b"x")
    b = cohort_fingerprint(source)
    (data / "bags" / "extra.h5").unlink()
    assert b != a and cohort_fingerprint(source) == a
    site_map = tmp_path / "map.csv"
    site_map.write_text("code,site\n")
    assert cohort_fingerprint(source, [str(site_map)]) != a


def test_supervisor_restarts_a_resident_process_that_dies(tmp_path, monkeypatch):
    from umeml.client.warm import ResidentRuntime

    # a stand-in resident: listens on the socket, then dies at once the first time
    script = tmp_path / "fake_resident.py"
    script.write_text(
        "import socket, sys, time, pathlib\n"
        "p = sys.argv[sys.argv.index('--socket') + 1]\n"
        "marker = pathlib.Path(p).parent / 'started'\n"
        "n = int(marker.read_text()) + 1 if marker.exists() else 1\n"
        "marker.write_text(str(n))\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(1)\n"
        "sys.exit(1) if n == 1 else time.sleep(60)\n")
    rt = ResidentRuntime(tmp_path / "site.yaml", None, tmp_path / "resident.log", dict(os.environ), max_pause=1.0)
    monkeypatch.setattr(rt, "command", lambda: [sys.executable, str(script), "--socket", str(rt.socket)])
    try:
        assert rt.start(["/bin/false"], ready_timeout=60)
        deadline = time.monotonic() + 60
        while rt.starts < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rt.starts == 2 and rt.wait_ready(60)
        assert "exited with code 1; restarted" in (tmp_path / "resident.log").read_text()
    finally:
        rt.stop()
    assert rt.proc.poll() is not None and not rt.folder.exists()
    assert json.dumps(rt.superexec_env({"PATH": "/usr/bin"})["PATH"]).startswith(json.dumps(str(rt.folder))[:-1])


class _FakeRuntime:
    """A Runtime API client whose task heartbeats answer ``answers`` in turn (a response with
    ``success``, or an HTTP status code to raise)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def SendTaskHeartbeat(self, request):  # noqa: N802 - Flower's RuntimeHttpClient method name
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

        self.calls += 1
        answer = self.answers.pop(0)
        if type(answer) is int:  # an HTTP status (a bool is an int too)
            response = httpx.Response(answer, request=httpx.Request("POST", "http://127.0.0.1/v1/runtime/heartbeat"))
            raise httpx.HTTPStatusError("status", request=response.request, response=response)
        return SendTaskHeartbeatResponse(success=answer)


def test_a_task_that_is_gone_silences_its_heartbeat_instead_of_interrupting_the_resident(monkeypatch):
    # Flower's task heartbeat raises SIGINT in its process when the SuperNode no longer knows the
    # task: one task per process in flwr-clientapp, but in the resident it ended the runtime
    import signal

    from flwr.supercore.heartbeat import make_task_heartbeat_fn_http

    from umeml.client.resident import task_heartbeat_fn

    raised = []
    monkeypatch.setattr(signal, "raise_signal", lambda sig: raised.append(sig))
    assert make_task_heartbeat_fn_http(_FakeRuntime(False))() and raised == [signal.SIGINT]  # Flower's, pinned
    raised.clear()
    for gone in (False, 401, 404):
        client = _FakeRuntime(True, gone, True)
        beat = task_heartbeat_fn(client)
        assert beat() and beat() and beat()
        assert client.calls == 2 and raised == [], gone  # after "gone", no more beats are sent
    flaky = _FakeRuntime(503, True)
    beat = task_heartbeat_fn(flaky)
    assert beat() is False and beat() is True  # a failed beat, retried by the sender, as Flower's
    with pytest.raises(Exception, match="status"):
        task_heartbeat_fn(_FakeRuntime(400))()


def _unauthorized_runtime_api():
    """A Runtime API on 127.0.0.1 that answers every request 401 (a SuperNode that no longer
    knows the task's token). Returns (server, address); the caller shuts it down."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's method name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def test_a_task_whose_token_is_refused_fails_alone_and_the_resident_process_is_not_interrupted():
    # Flower's HTTP retry answers a 401 by sending SIGINT to its own process: in the fault script a
    # pull that outlived a SuperLink restart came back 401 and ended the resident (exit code -2)
    import signal
    import threading

    from umeml.client.resident import AppCache, serve_task

    received = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: received.append(sig))
    server, address = _unauthorized_runtime_api()
    try:
        t0 = time.monotonic()
        line = serve_task(address, "no-longer-known", True, None, AppCache())
        elapsed = time.monotonic() - t0
    finally:
        server.shutdown()
        signal.signal(signal.SIGINT, previous)
    assert received == [], "the resident process was sent SIGINT"
    assert line.startswith("served ? in") and line.endswith(": failed"), line  # nothing pulled, the task failed
    assert elapsed < 5, f"the refused task held the runtime for {elapsed:.1f} s"  # Flower's sleeps 6 s after its SIGINT
    assert not [t for t in threading.enumerate() if "eartbeat" in type(t).__name__ + t.name and t.is_alive()]


class _StalledRuntime:
    """A Runtime API client whose ``PullObject`` answers "unavailable" for the ids in ``stalled``."""

    def __init__(self, stalled=()):
        self.stalled, self.pulls = set(stalled), 0

    def PullObject(self, request):  # noqa: N802 - Flower's RuntimeHttpClient method name
        from flwr.proto.message_pb2 import PullObjectResponse

        self.pulls += 1
        ok = request.object_id not in self.stalled
        return PullObjectResponse(object_found=True, object_available=ok, object_content=b"x" if ok else b"")


def _pull(guard, ids, max_time):
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    fn = make_pull_object_fn_protobuf(guard.PullObject, Node(node_id=1), 7)
    return pull_objects(ids, fn, max_time=max_time, initial_backoff=0.01, backoff_cap=0.02)


def test_a_stalled_pull_gives_up_when_another_message_waits_and_keeps_flowers_patience_alone():
    # the fault script: a message of the run whose SuperLink died never arrived; its pull held the
    # resumed run's messages back for MESSAGE_PULL_MAX_S (120 s)
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    from umeml.client.resident import StalledPullGuard

    waiting = []
    guard = StalledPullGuard(_StalledRuntime({"b"}), lambda: bool(waiting), stall_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ObjectPullError, match="timeout or retry limit"):  # alone: Flower's own limit
        _pull(guard, ["a", "b"], max_time=1.0)
    assert time.monotonic() - t0 >= 1.0
    waiting.append("next")
    guard = StalledPullGuard(_StalledRuntime({"b"}), lambda: bool(waiting), stall_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ObjectPullError, match="another message is waiting"):
        _pull(guard, ["a", "b"], max_time=30.0)
    assert time.monotonic() - t0 < 5  # instead of max_time
    runtime = _StalledRuntime()
    assert _pull(StalledPullGuard(runtime, lambda: True, stall_s=0.2), ["a", "b", "c"], 5.0) == \
        {k: b"x" for k in "abc"} and runtime.pulls == 3  # objects arriving: never refused
    assert StalledPullGuard(runtime, lambda: True).pulls == 3  # every other attribute is the client's

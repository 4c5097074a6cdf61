"""The Flower 1.42 details that the warm site runtime and the tuned SuperNode rely on.

These fail on a Flower upgrade that changes them: then revisit umeml.client.resident,
umeml.client.warm and umeml.flower.supernode_main (and PINNED_MINOR in umeml.flower.pins).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from umeml.flower import pins


def test_installed_flower_is_the_pinned_minor_version_and_matches_the_contract():
    assert pins.flwr_version().startswith(pins.PINNED_MINOR + "."), pins.flwr_version()
    assert pins.contract_problems() == []
    assert pins.central_dp_problems() == []  # umeml.server.strategies' secure central-DP noise


def test_the_superexec_command_line_is_what_the_resident_runtime_reads(monkeypatch):
    # what SubprocessExecutor.launch really starts, read back by the resident runtime's parser
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from umeml.client.resident import parse_launch

    started = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **kw: started.append(args))
    fields = ExecutionSpec.__dataclass_fields__
    spec = {"task_type": TaskType.CLIENT_APP, "runtime_api_address": "127.0.0.1:9094", "token": "tok-123",
            "insecure": True, "root_certificates_path": None, "parent_pid": 4242, "runtime_dependency_install": False,
            "suppress_output": False, "task_id": 1, "fab_hash": None}
    subprocess_executor.SubprocessExecutor().launch(ExecutionSpec(**{k: v for k, v in spec.items() if k in fields}))
    (argv,) = started
    assert argv[0] == "flwr-clientapp"
    assert parse_launch(argv[1:]) == ("127.0.0.1:9094", "tok-123", True, None)


def test_a_launch_asking_for_runtime_installs_is_refused_to_flowers_own_process():
    from umeml.client.resident import Refused, parse_launch

    with pytest.raises(Refused, match="dependency"):
        parse_launch(["--runtime-api-address", "127.0.0.1:1", "--token", "t", "--insecure",
                      "--allow-runtime-dependency-installation"])
    with pytest.raises(Refused, match="unreadable"):
        parse_launch(["--no-such-flag"])


def test_tuned_polling_replaces_exactly_flowers_two_sleeps(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    from umeml.flower import supernode_main as sm

    slept = []
    monkeypatch.setattr(sm.time, "sleep", slept.append)
    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    assert sm.tune_polling(0.2, 0.02) == []
    assert isinstance(sci.time, sm.TunedTime)
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    sci.time.sleep(1.25)
    assert slept == [0.2, 0.02, 1.25] and sci.time.monotonic() > 0


def test_a_node_that_served_a_message_polls_fast_for_the_rest_of_the_run(monkeypatch):
    # a site that finished its part of a wave waited 0.5 s on average (the 1 s idle pause) for
    # the next round's message; at idle it polls every second again
    from umeml.flower import supernode_main as sm

    now, slept = [1000.0], []
    monkeypatch.setattr(sm.time, "sleep", slept.append)
    monkeypatch.setattr(sm.time, "monotonic", lambda: now[0])
    tuned = sm.TunedTime(1.0, 0.05, 0.25)
    tuned.sleep(3)  # idle: nothing served yet
    tuned.sleep(0.5)  # waiting for a ClientApp's reply: serving a message
    now[0] += sm.BUSY_WINDOW_S - 1
    tuned.sleep(3)
    now[0] += 2
    tuned.sleep(3)
    assert slept == [1.0, 0.05, 0.25, 1.0]
    assert sm.TunedTime(1.0, 0.05, 5.0).busy == 1.0 and sm.TunedTime(3.0, 0.5).busy == 3.0  # never above idle


def test_polling_settings_are_checked(monkeypatch):
    from umeml.flower.supernode_main import IDLE_ENV, poll_setting

    monkeypatch.setenv(IDLE_ENV, "0.3")
    assert poll_setting(IDLE_ENV, 0.5) == 0.3
    monkeypatch.setenv(IDLE_ENV, "0")
    with pytest.raises(ValueError, match=IDLE_ENV):
        poll_setting(IDLE_ENV, 0.5)


def test_the_launcher_hands_over_or_runs_flowers_own_command(tmp_path):
    # no resident process listening: the launcher runs the real command with the same arguments
    from umeml.client.warm import write_launcher

    fake = tmp_path / "flower-clientapp"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('FLOWER', *sys.argv[1:])\n")
    fake.chmod(0o700)
    launcher = write_launcher(tmp_path / "bin", tmp_path / "none.sock", [str(fake)])
    out = subprocess.run([str(launcher), "--token", "abc"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "FLOWER --token abc" and "Flower's own flwr-clientapp" in out.stderr
    assert Path(launcher).name == "flwr-clientapp"


def test_the_launcher_hands_its_command_line_to_a_listening_resident(tmp_path):
    import json
    import socket
    import threading

    from umeml.client.warm import write_launcher

    sock_path = tmp_path / "r.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    got = []

    def answer():
        conn, _ = server.accept()
        with conn:
            got.append(json.loads(conn.makefile("rb").readline()))
            conn.sendall(b"accepted\n")

    t = threading.Thread(target=answer)
    t.start()
    launcher = write_launcher(tmp_path / "bin", sock_path, [str(tmp_path / "never-run")])
    out = subprocess.run([str(launcher), "--token", "abc", "--insecure"], capture_output=True, text=True, timeout=60)
    t.join(10)
    server.close()
    assert out.returncode == 0 and out.stderr == "" and got == [{"argv": ["--token", "abc", "--insecure"]}]


def test_the_supernode_retries_an_http_500_instead_of_exiting(monkeypatch):
    import httpx
    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_connection

    from umeml.flower import supernode_main as sm

    # Flower's own codes: importing umeml.client.app or umeml.server.app (earlier tests) adds 500
    monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES", frozenset(http_retry._RETRYABLE_STATUS_CODES) - sm.RETRIED_TOO)
    monkeypatch.setattr(fleet_http_connection, "HeartbeatSender", fleet_http_connection.HeartbeatSender)
    assert 500 not in http_retry._RETRYABLE_STATUS_CODES  # Flower's own behaviour: exit on a 500
    assert sm.tolerate_transient_500() == []
    assert 500 in http_retry._RETRYABLE_STATUS_CODES and 503 in http_retry._RETRYABLE_STATUS_CODES

    def fails(code):
        def fn():
            request = httpx.Request("POST", "http://127.0.0.1/v1/fleet/send-node-heartbeat")
            raise httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request))
        return fn

    assert sm._tolerant(fails(500))() is False
    with pytest.raises(httpx.HTTPStatusError):
        sm._tolerant(fails(401))()
    sender = fleet_http_connection.HeartbeatSender(fails(500))
    assert sender.heartbeat_fn() is False


def _recorded_waits(monkeypatch, unavailable: int) -> list[float]:
    """The pauses Flower's ``pull_objects`` takes for one object that is unavailable ``unavailable`` times."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    waits: list[float] = []

    class Event(iu.threading.Event):
        def wait(self, timeout=None):
            if timeout is None:  # the thread pool's own synchronisation
                return super().wait()
            waits.append(timeout)  # pull_objects' backoff: recorded, not slept
            return False

    monkeypatch.setattr(iu.threading, "Event", Event)
    calls = []

    def pull(object_id):
        calls.append(object_id)
        if len(calls) <= unavailable:
            raise iu.ObjectUnavailableError(object_id)
        return b"content"

    assert iu.pull_objects(["a" * 64], pull) == {"a" * 64: b"content"}
    return waits


def test_fast_object_pulls_retry_an_object_still_uploading_within_milliseconds(monkeypatch):
    # Flower waits 1, 2, 4, 8 s for an object whose upload has not finished: 15 s for a 50 ms upload
    from umeml.flower import pulls

    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))  # restored after the test
    monkeypatch.delenv(pulls.ENV, raising=False)
    assert pulls.fast_object_pulls() == []
    waits = _recorded_waits(monkeypatch, 6)
    assert len(waits) == 6 and waits[0] <= 1.2 * pulls.INITIAL_BACKOFF_S and max(waits) <= 1.2 * pulls.BACKOFF_CAP_S
    # the same patience as Flower's: as many seconds of retries per object (more, shorter tries)
    pull, tree = pulls.pulling_functions()
    assert pull.__kwdefaults__["max_tries_per_object"] * pulls.BACKOFF_CAP_S >= 500 * 10
    assert tree.__kwdefaults__["initial_backoff"] == pulls.INITIAL_BACKOFF_S  # a ClientApp's message pull too


def test_flowers_own_backoff_is_kept_when_asked(monkeypatch):
    from umeml.flower import pulls

    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "initial_backoff": 1, "backoff_cap": 10})
    monkeypatch.setenv(pulls.ENV, "flower")
    assert pulls.fast_object_pulls() != []
    assert _recorded_waits(monkeypatch, 2)[0] >= 0.8


def test_the_serverapp_and_the_supernode_pull_with_the_short_backoff(monkeypatch):
    import umeml.server.app  # noqa: F401 - importing the ServerApp's module sets it for its process
    from umeml.flower import pulls
    from umeml.flower import supernode_main as sm

    pull, _ = pulls.pulling_functions()
    assert pull.__kwdefaults__["initial_backoff"] == pulls.INITIAL_BACKOFF_S
    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "initial_backoff": 1, "backoff_cap": 10})
    monkeypatch.setattr(sm, "tune_polling", lambda *a: [])
    monkeypatch.setattr(sm, "tolerate_transient_500", lambda: [])
    import flwr.supernode.cli as cli

    monkeypatch.setattr(cli, "flower_supernode", lambda: None)
    monkeypatch.setattr(sys, "argv", ["x"])
    sm.main([])
    assert pull.__kwdefaults__["initial_backoff"] == pulls.INITIAL_BACKOFF_S


def test_the_resident_runtime_pulls_its_messages_with_the_short_backoff(monkeypatch, tmp_path):
    from umeml.client import resident
    from umeml.flower import pins, pulls

    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "initial_backoff": 1, "backoff_cap": 10,
                                                   "max_time": 7200})
    monkeypatch.setattr(resident.signal, "signal", lambda *a: None)
    monkeypatch.setattr(resident.threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: None})())
    monkeypatch.setattr(pins, "contract_problems", lambda: [])

    class Stop(Exception):
        pass

    def stop(*a):
        raise Stop

    monkeypatch.setattr(resident, "warm_up", stop)  # stops main() where it starts serving
    with pytest.raises(Stop):
        resident.main(["--socket", str(tmp_path / "s"), "--site", str(tmp_path / "site.yaml")])
    assert pulls.pulling_functions()[1].__kwdefaults__["initial_backoff"] == pulls.INITIAL_BACKOFF_S
    # a message whose objects never reach the SuperNode (its SuperLink died mid-pull) blocked the
    # one-at-a-time runtime for Flower's 2 h: the resident gives up its message pulls sooner
    assert pulls.pulling_functions()[1].__kwdefaults__["max_time"] == resident.MESSAGE_PULL_MAX_S
    assert pulls.pulling_functions()[0].__kwdefaults__["max_time"] == 7200  # the SuperNode's, ServerApp's: Flower's


def test_the_superlinks_superexec_is_started_as_flowers_superlink_would_start_it():
    # the coordinator runs flower-superlink --isolation process and starts the SuperExec itself
    # (umeml.flower.superexec_main): same arguments as the SuperLink's own in subprocess mode
    import importlib

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module (the package exports the function)

    from umeml.flower.superexec_main import superexec_command

    args = fs._parse_args_run_superlink().parse_args(["--insecure", "--isolation", "process"])
    assert args.isolation == "process"
    for certs, root in ((None, None), ((b"ca", b"crt", b"key"), "/tls/ca.crt")):
        flower = fs._get_superexec_command(runtime_address="127.0.0.1:9093", runtime_certificates=certs,
                                           runtime_root_certificates_path=root, parent_pid=4242,
                                           runtime_dependency_install=False)
        ours = superexec_command("127.0.0.1:9093", 4242, root)
        assert ours[:3] == [sys.executable, "-m", "umeml.flower.superexec_main"]
        assert flower == ["flower-superexec", *ours[3:]]
    assert pins.superexec_problems() == []


def test_the_superexec_shim_retries_http_500_and_runs_flowers_superexec(monkeypatch):
    import httpx
    from flwr.supercore import cli
    from flwr.supercore.retry import http_retry

    from umeml.flower import superexec_main
    from umeml.flower.supernode_main import RETRIED_TOO

    monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES", frozenset(http_retry._RETRYABLE_STATUS_CODES) - RETRIED_TOO)
    ran = []
    monkeypatch.setattr(cli, "flower_superexec", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["x"])
    superexec_main.main(["--insecure", "--runtime-api-address", "127.0.0.1:1"])
    assert ran == [["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:1"]]
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/acquire-task")
    error = httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
    assert http_retry.make_simple_http_retry_invoker().should_giveup(error) is False


def _resident_start(monkeypatch, tmp_path, version: str):
    """Run the resident runtime's start-up up to its warm-up with ``version`` as the installed
    Flower; returns (exit code or "warm-up reached", how often the version was read)."""
    from umeml.client import resident
    from umeml.flower import pulls

    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))  # restored after the test
    monkeypatch.delenv(pulls.ENV, raising=False)
    monkeypatch.setattr(resident.signal, "signal", lambda *a: None)
    monkeypatch.setattr(resident.threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: None})())
    reads = []
    monkeypatch.setattr(pins, "flwr_version", lambda: reads.append(version) or version)

    class Stop(Exception):
        pass

    def stop(*a):
        raise Stop

    monkeypatch.setattr(resident, "warm_up", stop)
    try:
        code = resident.main(["--socket", str(tmp_path / "s"), "--site", str(tmp_path / "site.yaml")])
    except Stop:
        code = "warm-up reached"
    return code, len(reads)


def test_the_resident_runtime_checks_the_flower_version_once(monkeypatch, tmp_path):
    # it was read twice at start-up: by the contract check and again by the short pull backoff
    from umeml.client import resident
    from umeml.flower import pulls

    assert _resident_start(monkeypatch, tmp_path, pins.flwr_version()) == ("warm-up reached", 1)
    assert pulls.pulling_functions()[1].__kwdefaults__["initial_backoff"] == pulls.INITIAL_BACKOFF_S
    # the check's meaning kept: another Flower minor version and the runtime does not start
    assert _resident_start(monkeypatch, tmp_path, "1.99.0") == (resident.EXIT_FLOWER_MISMATCH, 1)


def test_the_fallback_clientapp_pulls_with_the_short_backoff_and_runs_flowers_own(monkeypatch):
    # while the resident restarts, Flower's flwr-clientapp serves messages: it waited 1 s, 2 s, 4 s ...
    from importlib.metadata import entry_points

    import flwr.supernode.cli as cli

    from umeml.flower import clientapp_main, pulls

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "flwr-clientapp"]
    assert script.value == "flwr.supernode.cli:flwr_clientapp"  # what the shim runs instead of the script
    for fn in pulls.pulling_functions():
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "initial_backoff": 1, "backoff_cap": 10})
    monkeypatch.delenv(pulls.ENV, raising=False)
    ran = []
    tree = pulls.pulling_functions()[1]
    monkeypatch.setattr(cli, "flwr_clientapp", lambda: ran.append((list(sys.argv), tree.__kwdefaults__["initial_backoff"])))
    monkeypatch.setattr(sys, "argv", ["x"])
    clientapp_main.main(["--runtime-api-address", "127.0.0.1:1", "--token", "t"])
    assert ran == [(["flwr-clientapp", "--runtime-api-address", "127.0.0.1:1", "--token", "t"], pulls.INITIAL_BACKOFF_S)]
    assert tree.__kwdefaults__["max_time"] != 120  # a process per message blocks nothing: Flower's patience


def test_the_launchers_fallback_is_flowers_flwr_clientapp_through_the_shim(tmp_path):
    from umeml.client.warm import write_launcher
    from umeml.flower.clientapp_main import clientapp_command

    launcher = write_launcher(tmp_path / "bin", tmp_path / "none.sock", clientapp_command())
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--runtime-api-address" in out.stdout, out.stdout + out.stderr
    assert "Flower's own flwr-clientapp" in out.stderr and "warning" not in out.stderr


def test_the_serverapp_shim_retries_http_500_in_its_task_heartbeat_and_runs_flowers_own(monkeypatch, tmp_path):
    import importlib

    import flwr.superlink.cli as cli
    import httpx

    from umeml.flower import superexec_main

    rs = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    monkeypatch.setattr(rs, "make_task_heartbeat_fn_http", rs.make_task_heartbeat_fn_http)  # restored after
    ran = []
    monkeypatch.setattr(cli, "flwr_serverapp", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["x"])
    superexec_main.serverapp_main(["--token", "t"])
    assert ran == [["flwr-serverapp", "--token", "t"]]

    class Locked:
        def SendTaskHeartbeat(self, request):  # noqa: N802 - Flower's name
            req = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/send-task-heartbeat")
            raise httpx.HTTPStatusError("500", request=req, response=httpx.Response(500, request=req))

    assert rs.make_task_heartbeat_fn_http(Locked())() is False  # a failed beat (retried), not the end of the thread
    monkeypatch.setenv("PATH", "/usr/bin")
    script = superexec_main.serverapp_shim(tmp_path / "bin")
    assert script.name == "flwr-serverapp" and superexec_main.os.environ["PATH"].startswith(str(tmp_path / "bin"))

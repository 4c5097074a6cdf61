"""What umeml relies on in Flower 1.42's internals, checked in one place.

The warm site runtime (:mod:`umeml.client.resident`) replaces the ``flwr-clientapp`` command
that the SuperExec starts once per message, and the tuned SuperNode
(:mod:`umeml.flower.supernode_main`) shortens two sleeps that Flower hard-codes. Both depend on
details Flower does not promise to keep; :func:`contract_problems` lists every detail that
changed, and both fall back to Flower's stock behaviour (a process per message, Flower's own
sleeps) when it lists anything. ``tests/test_flower_pins.py`` fails on a Flower upgrade that
breaks them.
"""

from __future__ import annotations

import importlib
import inspect

PINNED_MINOR = "1.42"


def flwr_version() -> str:
    """The installed Flower version."""
    from importlib.metadata import version

    return version("flwr")


def _version_problem() -> str | None:
    found = flwr_version()
    if ".".join(found.split(".")[:2]) != PINNED_MINOR:
        return f"flwr {found} is installed; umeml's warm runtime and tuned polling are written for flwr {PINNED_MINOR}.x"
    return None


def launch_problems() -> list[str]:
    """Differences in how the SuperExec launches a ClientApp: the command name, the address
    flag and the token flag that the resident runtime receives."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    problems = []
    if TASK_TYPE_TO_COMMAND.get(TaskType.CLIENT_APP) != "flwr-clientapp":
        problems.append(f"the SuperExec launches {TASK_TYPE_TO_COMMAND.get(TaskType.CLIENT_APP)!r}, not flwr-clientapp")
    if TASK_TYPE_TO_APPIO_API_ADDRESS_ARG.get(TaskType.CLIENT_APP) != "--runtime-api-address":
        problems.append("the ClientApp's Runtime API address flag is no longer --runtime-api-address")
    source = inspect.getsource(SubprocessExecutor.launch)
    if '"--token"' not in source or "subprocess.Popen(args" not in source:
        problems.append("SubprocessExecutor.launch no longer starts the command with --token")
    return problems


def runtime_problems() -> list[str]:
    """Differences in the ClientApp process's Runtime API helpers the resident runtime calls."""
    from flwr.supernode.runtime import run_clientapp as rc

    problems = []
    expected = {"pull_task_input": ["client"], "push_message": ["client", "message", "context"],
                "push_task_output": ["client", "context", "sub_status", "details"]}
    for name, params in expected.items():
        fn = getattr(rc, name, None)
        if fn is None or list(inspect.signature(fn).parameters) != params:
            problems.append(f"flwr.supernode.runtime.run_clientapp.{name}{params} changed")
    if "client.PullObject" not in inspect.getsource(rc.pull_task_input):  # resident.StalledPullGuard wraps it
        problems.append("run_clientapp.pull_task_input no longer pulls objects with client.PullObject")
    from flwr.supercore.retry.http_retry import make_simple_http_retry_invoker

    if not callable(getattr(make_simple_http_retry_invoker(), "should_giveup", None)):  # resident.task_retry wraps it
        problems.append("the RetryInvoker of make_simple_http_retry_invoker() has no should_giveup")
    return problems


def polling_problems() -> list[str]:
    """Differences in the SuperNode's two hard-coded sleeps: 3 s after an empty poll of the
    SuperLink, 0.5 s between checks for a ClientApp's reply."""
    from flwr.supernode import start_client_internal as sci

    problems = []
    if "time.sleep(3)" not in inspect.getsource(sci.start_client_internal):
        problems.append("start_client_internal no longer sleeps time.sleep(3) after an empty poll")
    if "time.sleep(0.5)" not in inspect.getsource(sci._push_messages):
        problems.append("_push_messages no longer waits for replies with time.sleep(0.5)")
    return problems


def retry_problems() -> list[str]:
    """Differences in what the SuperNode's HTTP retry and node heartbeat are built from (the
    tuned SuperNode adds HTTP 500 to the retried status codes and wraps the heartbeat)."""
    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_connection

    problems = []
    codes = getattr(http_retry, "_RETRYABLE_STATUS_CODES", None)
    if not isinstance(codes, frozenset) or "_RETRYABLE_STATUS_CODES" not in inspect.getsource(http_retry):
        problems.append("flwr.supercore.retry.http_retry._RETRYABLE_STATUS_CODES is gone")
    if "HeartbeatSender(send_node_heartbeat)" not in inspect.getsource(fleet_http_connection):
        problems.append("fleet_http_connection no longer builds HeartbeatSender(send_node_heartbeat)")
    return problems


def superexec_problems() -> list[str]:
    """Differences in what the SuperLink's SuperExec and its ServerApps retry with
    (:mod:`umeml.flower.superexec_main` adds HTTP 500 to Flower's retried status codes and wraps the
    ServerApp's task heartbeat): the SuperExec's Runtime API client is built with
    ``make_simple_http_retry_invoker``, which reads ``_RETRYABLE_STATUS_CODES`` at each failure; it
    launches ``flwr-serverapp`` by that name; ``run_serverapp`` builds its task heartbeat with
    ``make_task_heartbeat_fn_http``.
    How the SuperLink would start it (``--isolation``, the command line) is checked by
    tests/test_flower_pins.py, not here: that would import the whole SuperLink into the SuperExec."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.retry import http_retry
    from flwr.supercore.superexec import run_superexec
    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the package exports the function

    problems = []
    if TASK_TYPE_TO_COMMAND.get(TaskType.SERVER_APP) != "flwr-serverapp":
        problems.append(f"the SuperExec launches {TASK_TYPE_TO_COMMAND.get(TaskType.SERVER_APP)!r}, not flwr-serverapp")
    if "make_task_heartbeat_fn_http(grid._runtime_client)" not in inspect.getsource(run_serverapp.run_serverapp):
        problems.append("run_serverapp no longer builds its task heartbeat with make_task_heartbeat_fn_http")
    if not isinstance(getattr(http_retry, "_RETRYABLE_STATUS_CODES", None), frozenset):
        problems.append("flwr.supercore.retry.http_retry._RETRYABLE_STATUS_CODES is gone")
    if "retry_invoker=make_simple_http_retry_invoker()" not in inspect.getsource(run_superexec.run_superexec):
        problems.append("run_superexec no longer builds its client with make_simple_http_retry_invoker()")
    return problems


def central_dp_problems() -> list[str]:
    """Differences in what ``umeml.server.strategies``' secure central-DP noise overrides: both
    fixed-clipping wrappers add their noise by calling ``self._add_noise_to_aggregated_arrays``
    on the aggregate, and its standard deviation comes from ``compute_stdv``."""
    from flwr.serverapp.strategy import dp_fixed_clipping as dp
    from flwr.supercore import differential_privacy

    problems = []
    for cls in (dp.DifferentialPrivacyServerSideFixedClipping, dp.DifferentialPrivacyClientSideFixedClipping):
        if "self._add_noise_to_aggregated_arrays(" not in inspect.getsource(cls.aggregate_train):
            problems.append(f"{cls.__name__}.aggregate_train no longer calls _add_noise_to_aggregated_arrays")
    flowers = getattr(dp.DifferentialPrivacyFixedClippingBase, "_add_noise_to_aggregated_arrays", None)
    if flowers is None or "compute_stdv(" not in inspect.getsource(flowers):
        problems.append("_add_noise_to_aggregated_arrays no longer uses compute_stdv")
    if not callable(getattr(differential_privacy, "compute_stdv", None)):
        problems.append("flwr.supercore.differential_privacy.compute_stdv is gone")
    return problems


def pull_problems() -> list[str]:
    """Differences in Flower's object pulls whose backoff :mod:`umeml.flower.pulls` shortens: the
    keyword defaults of ``pull_objects`` and ``pull_and_inflate_object_from_tree``, and that the
    SuperNode, the ServerApp's grid and the ClientApp's runtime call those very functions with
    them (no backoff of their own)."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.runtime import run_clientapp as rc

    from umeml.flower.pulls import KEYS, pulling_functions

    pull, pull_tree = pulling_functions()
    problems = [f"{fn.__module__}.{fn.__name__} no longer takes {key}= (keyword default)"
                for fn in (pull, pull_tree) for key in KEYS if key not in (fn.__kwdefaults__ or {})]
    users = [(http_grid, "pull_objects", pull, http_grid.HttpGrid.pull_messages),
             (sci, "pull_objects", pull, sci._pull_and_store_message),
             (rc, "pull_and_inflate_object_from_tree", pull_tree, rc.pull_task_input)]
    for module, name, fn, caller in users:
        if getattr(module, name, None) is not fn:
            problems.append(f"{module.__name__} no longer pulls with inflatable_utils.{name}")
        elif "backoff" in inspect.getsource(caller):
            problems.append(f"{module.__name__}.{caller.__name__} sets a pull backoff of its own")
    return problems


def problems(*checks) -> list[str]:
    """The pinned-version problem (if any) followed by what each of ``checks`` (the functions
    above) finds (empty: the installed Flower matches)."""
    version = _version_problem()
    return ([version] if version else []) + [p for check in checks for p in check()]


def contract_problems() -> list[str]:
    """Every detail of Flower that the warm runtime and the tuned SuperNode rely on and that
    the installed Flower does not match (empty: all as pinned)."""
    return problems(launch_problems, runtime_problems, polling_problems, retry_problems)

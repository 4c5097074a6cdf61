"""The console shows umeml's lines, the run's log file everything (umeml.logs).

The unit tests drive Flower's real logger, console handler, deprecation helper and FedAvg
strategy (Flower 1.42): when an upgrade changes the texts umeml.logs matches, they fail. The
slow test runs the main job (`umeml-server simulate`, Ray included) as a user does.
"""

import logging
import subprocess
import sys
import warnings

import pytest
from flwr.common.logger import ConsoleHandler, warn_deprecated_feature
from flwr.serverapp.strategy import FedAvg

from umeml.config import dump_config
from umeml.logs import EVALUATION_NOTE, parse_level, run_logging

from fed_helpers import tiny_experiment


def _emit_like_a_simulation() -> None:
    """The lines a simulation produces: Flower INFO per round, its two notices, library warnings."""
    flower = logging.getLogger("flwr")
    flower.info("configure_train: Sampled 3 nodes (out of 3)")
    warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    FedAvg(fraction_evaluate=0.0)  # Flower warns that its federated evaluation will be skipped
    warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    warnings.warn("Tip: In future versions of Ray ...", FutureWarning, stacklevel=1)
    logging.getLogger("umeml.server").warning("site A1 sent NaN: update rejected")


def test_console_quiet_and_log_file_complete(tmp_path, capsys):
    flower_handlers = [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)]
    assert flower_handlers, "Flower 1.42 attaches its ConsoleHandler to the flwr logger at import"
    log_file = tmp_path / "run.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with run_logging(log_file, level=logging.WARNING):
            _emit_like_a_simulation()
    console = capsys.readouterr()
    text = console.out + console.err
    assert "configure_train" not in text
    assert "DEPRECATED" not in text and "DeprecationWarning" not in text and "FutureWarning" not in text
    assert "Federated evaluation will be skipped" not in text
    # umeml's warning, once, from the run's console handler (a handler an earlier test left on a
    # umeml logger may print its own "Logging error"; that is not the run's console)
    assert text.splitlines().count("WARNING umeml.server: site A1 sent NaN: update rejected") == 1
    logged = log_file.read_text()
    for fragment in ("configure_train: Sampled 3 nodes", "DEPRECATED FEATURE", "`run_simulation` function is deprecated",
                     EVALUATION_NOTE, "DeprecationWarning: an old API", "FutureWarning: Tip", "site A1 sent NaN"):
        assert fragment in logged, fragment
    assert "Federated evaluation will be skipped" not in logged  # reworded, not contradicted
    # everything is put back: Flower's own handler prints again after the run
    assert [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)] == flower_handlers
    assert not logging.getLogger("flwr").filters


def test_verbose_console_shows_flower_info_once(tmp_path, capsys):
    with run_logging(tmp_path / "run.log", level=parse_level("info")):
        logging.getLogger("flwr").info("configure_train: Sampled 3 nodes (out of 3)")
        FedAvg(fraction_evaluate=0.0)
    console = capsys.readouterr()
    text = console.out + console.err
    assert text.count("configure_train: Sampled 3 nodes") == 1
    assert text.count(EVALUATION_NOTE) == 1 and "Federated evaluation will be skipped" not in text


def test_parse_level_names_the_choices():
    assert parse_level("debug") == logging.DEBUG
    with pytest.raises(ValueError, match="DEBUG, INFO, WARNING, ERROR"):
        parse_level("loud")


@pytest.mark.slow  # Ray (run_simulation)
@pytest.mark.timeout(600)
def test_main_job_console_has_no_flower_info_and_no_deprecation(tiny_cohort_dir, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(dump_config(tiny_experiment(epochs=1, bootstrap=10, split={"test_sites": ["A2"]})))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "umeml.server.cli", "simulate", "--config", str(exp), "--data", str(tiny_cohort_dir),
           "--out", str(out), "--rounds", "2", "--no-report"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "round 2/2" in console and "held-out metrics after 2 rounds" in console
    for noise in ("INFO flwr", "configure_train", "aggregate_train", "DEBUG", "DEPRECATED", "DeprecationWarning",
                  "FutureWarning", "Federated evaluation will be skipped"):
        assert noise not in console, (noise, console[-3000:])
    logged = (out / "run.log").read_text()
    assert logged.count("configure_train: Sampled") == 2  # each round once, not twice
    assert "DEPRECATED FEATURE" in logged and EVALUATION_NOTE in logged


def test_simulate_takes_verbose_and_log_level():
    from umeml.server.cli import build_parser

    args = build_parser().parse_args(["simulate", "--log-level", "debug"])
    assert args.log_level == "DEBUG" and not args.verbose
    assert build_parser().parse_args(["simulate", "--verbose"]).verbose
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["simulate", "--log-level", "loud"])
    assert err.value.code == 2


def test_a_handler_left_on_the_umeml_logger_neither_doubles_nor_hides_lines(tmp_path, capsys):
    """`umeml-client extract` puts a stderr handler on the umeml logger with propagate off; a run
    later in the same process still prints umeml's warning once and logs it to its file."""
    umeml_logger = logging.getLogger("umeml")
    left = logging.StreamHandler(sys.stderr)
    umeml_logger.addHandler(left)
    umeml_logger.propagate = False
    try:
        with run_logging(tmp_path / "run.log", level=logging.WARNING):
            logging.getLogger("umeml.server").warning("site A1 sent NaN: update rejected")
        assert umeml_logger.handlers[-1] is left and umeml_logger.propagate is False  # put back
    finally:
        umeml_logger.removeHandler(left)
        umeml_logger.propagate = True
    text = capsys.readouterr().err
    assert text.count("site A1 sent NaN") == 1
    assert "site A1 sent NaN" in (tmp_path / "run.log").read_text()

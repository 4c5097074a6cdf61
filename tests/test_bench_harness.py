"""bench/_harness.py: the section writer keeps every other byte of docs/benchmarks.md, metric
picking, the /proc memory probes and the subprocess-worker protocol."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

from bench import _harness as harness
from bench._harness import metric_entry, metric_value, numbers, pick, write_section

HEAD = "# Benchmarks\n\nIntro with `## not a heading` inline.\n\n"
ALPHA = "## Alpha (2026-01-01, x86_64, 2 cores, CPU)\n\nalpha body\n\n"
BETA = "## Beta: sites (2026-01-02, x86_64, 2 cores, CPU)\n\nold beta\n\n### Beta subsection\n\nmore\n\n"
GAMMA = "## Gamma, config other.yaml (2026-01-03, x86_64, 2 cores, CPU)\n\n```\n## inside a code block\n```\n"
WHEN = "2026-02-02, x86_64, 2 cores, CPU"


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_bytes((HEAD + ALPHA + BETA + GAMMA).encode())
    return path


def test_replacing_the_middle_section_keeps_the_others_byte_identical(doc):
    write_section(doc, "## Beta: sites", "\nnew beta\n\n| a |\n| --- |\n", when=WHEN)
    new_beta = f"## Beta: sites ({WHEN})\n\nnew beta\n\n| a |\n| --- |\n\n"
    assert doc.read_bytes() == (HEAD + ALPHA + new_beta + GAMMA).encode()


def test_replacing_the_last_section_and_rerunning_changes_nothing_else(doc):
    write_section(doc, "## Gamma, config other.yaml", "gamma 2", when=WHEN)
    expected = HEAD + ALPHA + BETA + f"## Gamma, config other.yaml ({WHEN})\n\ngamma 2\n"
    assert doc.read_text() == expected
    write_section(doc, "## Gamma, config other.yaml", "gamma 2", when=WHEN)
    assert doc.read_text() == expected


def test_a_new_section_is_appended_once(doc):
    for _ in range(2):
        write_section(doc, "## Delta", "delta body", when=WHEN)
    text = doc.read_text()
    assert text == HEAD + ALPHA + BETA + GAMMA + f"\n## Delta ({WHEN})\n\ndelta body\n"
    assert text.count("## Delta") == 1


def test_titles_match_whole_headings_not_prefixes_or_code(doc):
    # "## Gamma" is not "## Gamma, config other.yaml"; the fenced "## inside" is no heading
    write_section(doc, "## Gamma", "plain gamma", when=WHEN)
    write_section(doc, "## inside a code block", "x", when=WHEN)
    text = doc.read_text()
    assert text.startswith(HEAD + ALPHA + BETA + GAMMA)
    assert text.count("## Gamma") == 2 and text.count("## inside a code block") == 2


def test_later_duplicates_are_removed_and_crlf_bytes_are_kept(tmp_path):
    path = tmp_path / "b.md"
    other = "## Other (x)\r\n\r\nwindows line ends\r\n\r\n"
    path.write_bytes(("## Dup (1)\n\nfirst\n\n" + other + "## Dup (2)\n\nsecond\n").encode())
    write_section(path, "## Dup", "only", when=WHEN)
    assert path.read_bytes() == (f"## Dup ({WHEN})\n\nonly\n\n" + other).encode()


def test_missing_file_and_bad_title(tmp_path):
    path = tmp_path / "new.md"
    write_section(path, "## First", "body", when=WHEN)
    assert path.read_text() == f"## First ({WHEN})\n\nbody\n"
    with pytest.raises(ValueError, match="'## ' heading"):
        write_section(path, "### Sub", "body")
    assert not list(tmp_path.glob(".*.tmp"))


def test_metric_picking_from_a_final_json():
    test = {"grade": {"auc_macro": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 60, "extra": 1}},
            "subtype": {"auc_macro": {"value": None, "n": 3}},
            "survival": "not evaluated"}
    assert metric_entry(test, "grade", "auc_macro") == {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 60}
    assert metric_entry(test, "subtype", "auc_macro") is None and metric_value(test, "survival", "c_index") is None
    assert metric_value(None, "grade", "auc_macro") is None
    assert pick(test) == {"grade": 0.8, "subtype": None, "survival": None}
    assert numbers([1.5, None, 2, True, "x"]) == [1.5, 2]


def test_memory_probes_see_this_process_and_a_child():
    st = harness.status()
    assert 0 < st["VmRSS"] <= st["VmHWM"]
    peak, value = harness.peak_extra(lambda: len(bytearray(64 * 2**20)))
    assert value == 64 * 2**20 and peak >= 32 * 2**20
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in harness.descendants(os.getpid())
        with harness.TreeMemory(interval=0.05) as mem:
            time.sleep(0.3)
        assert mem.peak_procs >= 2 and mem.peak_rss >= st["VmRSS"] // 2 and 0 < mem.peak_pss <= mem.peak_rss
    finally:
        child.kill()
        child.wait()


def test_worker_protocol_returns_the_last_json_line_and_reports_failures():
    # bench_modularity's own worker, in a fresh process started as `python -m bench.bench_modularity`
    res = harness.run_worker("bench.bench_modularity", "--threads", "1", "--block", "64", harness.WORKER_FLAG,
                             "mem", "blockwise", "128", timeout=300)
    assert res["impl"] == "blockwise" and res["m"] == 128 and res["peak_mb"] >= 0
    with pytest.raises(RuntimeError, match="exit code 2"):
        harness.run_worker("bench.bench_modularity", "--no-such-option", timeout=300)


SCRIPTS = sorted(p.stem for p in (harness.REPO / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_has_help(name, capsys):
    """Each script imports as bench.<name> (how `python -m bench.<name>` runs it) and answers --help."""
    import importlib

    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in {"umeml", "bench"}:
            raise
        pytest.skip(f"bench.{name} needs {err.name}, not installed here (the [extract] extra?)")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_recorded_command_keeps_an_argument_with_spaces_in_one_piece():
    # bench_privacy wrote `--setting per-head clip groups` unquoted: pasted back it is four arguments
    line = harness.command("bench.bench_privacy", ["--setting", "per-head clip groups", "--seeds", "0", "1"])
    assert line == "python -m bench.bench_privacy --setting 'per-head clip groups' --seeds 0 1"
    assert shlex.split(line)[3:5] == ["--setting", "per-head clip groups"]

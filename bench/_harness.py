"""What every benchmark script shares: metric picking, /proc memory probes, the subprocess-worker
protocol and the section writer for ``docs/benchmarks.md``.

Scripts run from the repository root as modules (``python -m bench.bench_scaling``), so they
import this file as ``bench._harness`` without touching ``sys.path``; a worker subprocess is
started the same way, from the repository root.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from umeml.rundir import PRIMARY_METRICS, has_value
from umeml.rundir import metric_entry as rundir_metric_entry

REPO = Path(__file__).resolve().parents[1]
TCGA = REPO.parent / "shared" / "data" / "tcga_gbmlgg"
PRIMARY = PRIMARY_METRICS  # the three primary test metrics (one per task)
WORKER_FLAG = "--worker"


# ---------------------------------------------------------------- metrics of a final.json

def metric_entry(metrics: dict | None, task: str, key: str) -> dict | None:
    """``{"value", "ci_low", "ci_high", "n"}`` of ``metrics[task][key]`` (a final.json ``test``,
    ``pooled`` or ``held_out_combined`` dict), or None where the task or metric is absent or
    has no numeric value (too few patients, one class only)."""
    m = rundir_metric_entry(metrics or {}, task, key)
    if has_value(m) and not isinstance(m["value"], bool):
        return {k: m.get(k) for k in ("value", "ci_low", "ci_high", "n")}
    return None


def metric_value(metrics: dict | None, task: str, key: str) -> float | None:
    """The numeric value of ``metrics[task][key]``, or None (see :func:`metric_entry`)."""
    entry = metric_entry(metrics, task, key)
    return None if entry is None else entry["value"]


def pick(metrics: dict | None, which: Iterable[tuple[str, str]] = PRIMARY) -> dict[str, float | None]:
    """``{task: value}`` of one metric per task (by default the primary ones)."""
    return {task: metric_value(metrics, task, key) for task, key in which}


def numbers(values: Iterable | None) -> list[float]:
    """The numeric entries of a final.json list (rounds without a figure hold null)."""
    return [v for v in values or [] if isinstance(v, (int, float)) and not isinstance(v, bool)]


def spread(values: Iterable) -> str:
    """``+mean ± sd`` (signed, sample sd; 0 for one value) of paired differences, ``-`` for none."""
    v = [float(x) for x in values]
    if not v:
        return "-"
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return f"{mean:+.3f} ± {sd:.3f}"


def mean_sd(values: Iterable) -> str:
    """``mean ± sd`` (sample sd) of a table cell, the mean alone for one value, ``-`` for none."""
    v = [float(x) for x in values]
    if not v:
        return "-"
    mean = sum(v) / len(v)
    if len(v) == 1:
        return f"{mean:.3f}"
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


def with_overrides(base, overrides: dict, where: str, **fixed):
    """``base`` (an ExperimentConfig) with section -> key -> value ``overrides`` and then the
    ``fixed`` (section, key) settings a bench needs (``federation__selection="last"``), checked
    like a file whose name is ``where``."""
    from umeml.config import config_from_dict, config_to_dict

    raw = config_to_dict(base)
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    for dotted, value in fixed.items():
        section, _, key = dotted.partition("__")
        if key:
            raw[section] = {**raw[section], key: value}
        else:
            raw[section] = value
    return config_from_dict(raw, where)


# ---------------------------------------------------------------- memory (Linux /proc)

def status(pid: int | str = "self") -> dict[str, int]:
    """Resident set size now (``VmRSS``) and its peak (``VmHWM``) of one process, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_extra(call: Callable[[], object]) -> tuple[int, object]:
    """Peak RSS during ``call()`` minus RSS just before it (bytes), and what ``call`` returned.

    It counts everything the process really touched (forward, backward, the autograd graph);
    tracemalloc would not see torch's buffers.
    """
    gc.collect()
    before = status()["VmRSS"]
    reset_peak()
    result = call()
    return status()["VmHWM"] - before, result


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we read it
            children.setdefault(ppid, []).append(int(entry))
    tree, stack = {root}, [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in tree:
                tree.add(c)
                stack.append(c)
    return tree


def rss_pss(pid: int) -> tuple[int, int]:
    """RSS and PSS of one process in bytes (0, 0 once it has ended)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        rss = int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1)) * 1024
        pss = int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1)) * 1024
        return rss, pss
    except (OSError, AttributeError):
        return 0, 0


class TreeMemory:
    """Samples the summed RSS and PSS of this process and all its descendants (Ray's processes
    included) every ``interval`` seconds; ``peak_rss``, ``peak_pss`` (bytes) and ``peak_procs``
    hold the maxima once the ``with`` block ends.

    Summed RSS counts shared pages once per process (an over-estimate); PSS splits them between
    the processes that map them (the better estimate of what the tree costs the machine).
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_rss, self.peak_pss, self.peak_procs = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(os.getpid())
            rss = pss = 0
            for pid in pids:
                r, p = rss_pss(pid)
                rss, pss = rss + r, pss + p
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- subprocess workers

def run_worker(module: str, *args: str, timeout: float | None = None) -> dict:
    """Run ``python -m <module> <args>`` from the repository root and return the JSON object
    on the last line of its stdout (what :func:`emit` prints).

    Each measurement gets a fresh process so that its peak memory and allocator state are its
    own. ``args`` normally end with ``--worker ...``; the worker's exit code must be 0.
    """
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def emit(result: dict) -> int:
    """A worker's answer: one JSON line on stdout (read by :func:`run_worker`); returns 0."""
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- docs/benchmarks.md

def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them ("n/a" where it is absent)."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


def stamp(date: str | None = None, machine: str | None = None, cores: int | None = None) -> str:
    """``2026-11-27, x86_64, 2 cores, CPU``: what a section heading says about the run."""
    return (f"{date or datetime.date.today().isoformat()}, {machine or platform.machine()}, "
            f"{cores or os.cpu_count()} cores, CPU")


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run (``argv`` None: this process's arguments)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    # quoted as a shell would need them: "--setting 'heads clip'" was written as two words
    return " ".join(["python -m", module, *(shlex.quote(str(a)) for a in args)])


_FENCE = re.compile(r"^\s*(```|~~~)")


def _section_starts(lines: list[str]) -> list[int]:
    """Indices of the ``## `` heading lines outside fenced code blocks."""
    starts, fenced = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            starts.append(i)
    return starts


def _is_title(line: str, title: str) -> bool:
    heading = line.rstrip("\r\n")
    return heading == title or heading.startswith(title + " (")


def write_section(path: Path, title: str, body: str, *, when: str | None = None, keep_when: bool = False) -> None:
    """Put ``title (when)`` and ``body`` into the markdown file ``path`` as one ``## `` section.

    The section whose heading is ``title``, alone or followed by `` (...)``, is replaced, from
    its heading up to the next ``## `` heading (or the end); any later section with the same
    title is removed, so a rerun never leaves a duplicate. Without one the section is appended.
    Every other byte of the file is kept. ``when`` defaults to :func:`stamp` (today, this
    machine); ``keep_when`` keeps the existing section's ``(when)`` instead (a rewrite that keeps
    the section's main figures keeps their date). The file is replaced atomically.
    """
    if not title.startswith("## ") or "\n" in title:
        raise ValueError(f"section title must be one '## ' heading line, got {title!r}")
    # bytes, split at "\n" only: every other section comes back byte for byte (CRLF included)
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", path.read_bytes().decode("utf-8")) if path.exists() else []
    starts = _section_starts(lines)
    bounds = [(s, next((t for t in starts if t > s), len(lines))) for s in starts]
    mine = [(s, e) for s, e in bounds if _is_title(lines[s], title)]
    body = body.strip("\n")
    old = lines[mine[0][0]].rstrip("\r\n") if mine else ""
    if keep_when and when is None and old.endswith(")") and old.startswith(title + " ("):
        when = old[len(title) + 2:-1]
    text = f"{title} ({when or stamp()})\n\n{body}\n"
    if mine:
        (start, end), later = mine[0], mine[1:]
        rest = [line for i, line in enumerate(lines[end:], end) if not any(s <= i < e for s, e in later)]
        doc = "".join(lines[:start]) + text + ("\n" if rest else "") + "".join(rest)
    else:
        doc = "".join(lines)
        if doc and not doc.endswith("\n"):
            doc += "\n"
        doc += ("\n" if doc else "") + text
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(doc.encode("utf-8"))
    os.replace(tmp, path)

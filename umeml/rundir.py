"""The run directory's schema: its file names, the records written into it, one ``metrics.csv``
shape for centralized and federated runs, and the one atomic write every writer uses.

A run directory (``umeml train``, ``umeml-server simulate`` / ``start``) holds:

- ``config.yaml`` the resolved experiment, ``final.json`` the result (:class:`CentralizedFinal`
  or :class:`FederatedFinal`, with ``schema_version``), ``metrics.csv`` one row per step, part,
  site and metric (:data:`METRICS_COLUMNS`), ``predictions.npz`` held-out per-patient outputs
  (only where the writer holds the patients' data), ``checkpoints/`` (``best.pt`` / ``last.pt``
  centralized, ``global.pt`` federated);
- federated runs also ``resume.pt``, ``preprocessing.json``, ``privacy.json``, ``progress.log``,
  ``coordinator.log``; simulations ``simulation.json``, ``run.log`` and ``sites/<site>/privacy.json``;
  ``roles.json`` the held-out and training sites (:class:`SiteRoles`); deployments
  ``flower-run.json``, ``app/``, ``run-config.toml``, ``superlink.log``, ``flower/`` and, while a
  coordinator runs, ``coordinator.lock`` (its process ids);
- ``report.html`` and ``plots/`` once reported; a ``--compare`` folder ``comparison.json``.

Schema versions: 1 is every run dir written before ``schema_version`` existed (``final.json``
without the field; ``metrics.csv`` long with columns ``round,site,kind,n,metric,value,note`` for
federated runs, wide with one row per epoch for centralized ones); 2 is this module's. Version-1
files are read and converted; anything else fails with a :class:`RunDirError` that says which
version it found and which this umeml reads.

This module imports nothing heavier than the standard library, so every layer may use it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Union

from umeml.errors import UmemlError

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
FINAL_FILE = "final.json"
PRIVACY_FILE = "privacy.json"
PREDICTIONS_FILE = "predictions.npz"
PREPROCESSING_FILE = "preprocessing.json"
RESUME_FILE = "resume.pt"
PROGRESS_FILE = "progress.log"
COORDINATOR_LOG = "coordinator.log"
RUN_LOG = "run.log"
FLOWER_RUN_FILE = "flower-run.json"
COMPARISON_FILE = "comparison.json"
SIMULATION_FILE = "simulation.json"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
CHECKPOINTS_DIR = "checkpoints"
SITES_DIR = "sites"
ROLES_FILE = "roles.json"
LOCK_FILE = "coordinator.lock"

# The metric each task is judged (and models are selected) by, in display order.
PRIMARY_METRICS: tuple[tuple[str, str], ...] = (("grade", "auc_macro"), ("subtype", "auc_macro"),
                                                ("survival", "c_index"))
# The columns of the terminal summary tables: the primary metrics plus balanced accuracy.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (("grade", "auc_macro"), ("grade", "balanced_accuracy"),
                                                ("subtype", "auc_macro"), ("subtype", "balanced_accuracy"),
                                                ("survival", "c_index"))


class RunDirError(UmemlError):
    """A run directory's file cannot be read: unreadable, of an unknown schema version or shape.
    The message names the file and what was expected."""


# ------------------------------------------------------------------ file names
def _entry(name: str, doc: str) -> property:
    return property(lambda self: self.root / name, doc=f"``{name}``: {doc}")


@dataclass(frozen=True)
class RunDir:
    """A run directory: every file's path, named once (``RunDir(path).final``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = _entry(CONFIG_FILE, "the resolved experiment config")
    metrics = _entry(METRICS_FILE, "one row per step, part, site and metric (METRICS_COLUMNS)")
    final = _entry(FINAL_FILE, "the result (CentralizedFinal or FederatedFinal)")
    privacy = _entry(PRIVACY_FILE, "the run's privacy ledger (federated runs with DP or noisy releases)")
    predictions = _entry(PREDICTIONS_FILE, "held-out per-patient outputs (centralized runs and simulations)")
    preprocessing = _entry(PREPROCESSING_FILE, "the federated preprocessing (bins, scaler, class weights)")
    resume = _entry(RESUME_FILE, "the coordinator's state after the last completed round")
    progress = _entry(PROGRESS_FILE, "the coordinator's progress lines")
    coordinator_log = _entry(COORDINATOR_LOG, "the coordinator's warnings and errors")
    log = _entry(RUN_LOG, "everything a simulation logged: umeml, Flower, Ray, Python warnings")
    flower_run = _entry(FLOWER_RUN_FILE, "Flower's accounting of a deployed run (traffic, compute)")
    comparison = _entry(COMPARISON_FILE, "a --compare folder's summary of its modes")
    simulation = _entry(SIMULATION_FILE, "where a simulation's cohort lives and its held-out sites (for --resume)")
    report = _entry(REPORT_FILE, "the self-contained report page")
    plots = _entry(PLOTS_DIR, "the report's figures")
    checkpoints = _entry(CHECKPOINTS_DIR, "model checkpoints")
    best_checkpoint = _entry(f"{CHECKPOINTS_DIR}/best.pt", "the selected model: centralized, the best validation "
                             "epoch; federated, the round federation.selection chose")
    last_checkpoint = _entry(f"{CHECKPOINTS_DIR}/last.pt", "the centralized model of the last epoch")
    global_checkpoint = _entry(f"{CHECKPOINTS_DIR}/global.pt", "the federated global model")
    sites = _entry(SITES_DIR, "simulated sites' own state folders")
    data = _entry("data", "the synthetic cohort a simulation without --data generates")
    app = _entry("app", "the Flower app bundle a deployment submits")
    run_config = _entry("run-config.toml", "a deployment's Flower run config")
    superlink_log = _entry("superlink.log", "the SuperLink's log")
    flower_state = _entry("flower", "the SuperLink's state folder")
    roles = _entry(ROLES_FILE, "a federated run's held-out and training sites (SiteRoles), fixed at its start")
    lock = _entry(LOCK_FILE, "a deployment's lock: the live coordinator's process ids (CoordinatorLock)")

    def site_state(self, site: str) -> Path:
        """A simulated site's state folder (its own ``privacy.json``)."""
        return self.root / SITES_DIR / site

    def existing_outputs(self) -> list[str]:
        """Names of the earlier run's outputs in this folder: the files and folders a run writes,
        and subfolders holding a run of their own (``--compare``, ``--leave-one-site-out``). The
        ``data/`` folder a simulation generates is input, not output. Empty when none (or no folder)."""
        if not self.root.is_dir():
            return []
        found = [name for name in RUN_OUTPUTS if (self.root / name).exists()]
        nested = [p.name + "/" for p in sorted(self.root.iterdir())
                  if p.is_dir() and p.name not in RUN_OUTPUTS and p.name != "data" and RunDir(p).existing_outputs()]
        return found + nested


# What a run writes into its folder (RunDir.existing_outputs): an --out holding any of these is
# an earlier run's, refused unless --overwrite (or --resume continues it).
RUN_OUTPUTS = (FINAL_FILE, METRICS_FILE, CONFIG_FILE, CHECKPOINTS_DIR, RESUME_FILE, PREDICTIONS_FILE,
               PREPROCESSING_FILE, PRIVACY_FILE, PROGRESS_FILE, COORDINATOR_LOG, FLOWER_RUN_FILE, COMPARISON_FILE,
               SIMULATION_FILE, REPORT_FILE, PLOTS_DIR, SITES_DIR, "app", "run-config.toml", "superlink.log",
               "flower")


def name_problem(name: str) -> str | None:
    """Why ``name`` (a site id, a slide id) cannot be used as one file or folder name under a
    folder (``sites/<site>``, ``<bags>/<slide>.h5``) without escaping it; None when it can."""
    if not name.strip():
        return "must not be empty"
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        return "must be a file name (no '/', '\\' or '..')"
    return None


def run_dir(path: str | Path | RunDir) -> RunDir:
    """``path`` as a :class:`RunDir` (a RunDir is returned as it is)."""
    return path if isinstance(path, RunDir) else RunDir(Path(path))


# ------------------------------------------------------------------ atomic writes and JSON
def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file beside it, then rename it over
    ``path``: readers see the old file or the new one, never half of one.

    When ``write`` raises, the temporary file is removed and the error propagates (the old file,
    if any, stays as it was). The temporary name is unique per call, so concurrent writers of one
    path never write into each other's file. No fsync: this guards against a crash of the
    process, not of the machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2))


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``; a :class:`RunDirError` naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: cannot read it as JSON ({err})") from err


# ------------------------------------------------------------------ metric entries
def metric_value(m: Any) -> float | None:
    """The value of a metric entry (``{"value", "ci_low", "ci_high", "n"}``) when it is a number;
    None for anything else (no entry, an error entry, a confusion matrix)."""
    if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
        return m["value"]
    return None


def has_value(m: Any) -> bool:
    """True when ``m`` is a metric entry with a numeric value."""
    return metric_value(m) is not None


def metric_entry(tasks: Any, task: str, metric: str) -> dict | None:
    """``tasks[task][metric]`` of a ``{task: {metric: entry}}`` dict, None where any level is missing."""
    per_task = tasks.get(task) if isinstance(tasks, dict) else None
    entry = per_task.get(metric) if isinstance(per_task, dict) else None
    return entry if isinstance(entry, dict) else None


def metrics_of_tasks(results: Iterable[Any], metrics: tuple[tuple[str, str], ...] = SUMMARY_METRICS
                     ) -> tuple[tuple[str, str], ...]:
    """The ``(task, metric)`` columns of ``metrics`` whose task appears in any of ``results``
    (``{task: {metric: entry}}`` dicts): a run without survival shows no c-index column, a
    survival-only run no grade or subtype column. Every column when no result names a task."""
    present = {t for r in results if isinstance(r, dict) for t, v in r.items() if isinstance(v, dict)}
    shown = tuple((t, k) for t, k in metrics if t in present)
    return shown or metrics


def format_metric(m: Any, ci_digits: int = 3) -> str:
    """``0.812 [0.74, 0.88]`` (value to 3 decimals, CI to ``ci_digits``), ``-`` without a value."""
    value = metric_value(m)
    if value is None:
        return "-"
    ci = f" [{m['ci_low']:.{ci_digits}f}, {m['ci_high']:.{ci_digits}f}]" if m.get("ci_low") is not None else ""
    return f"{value:.3f}{ci}"


# ------------------------------------------------------------------ metrics.csv
METRICS_COLUMNS = ("unit", "step", "kind", "site", "n", "task", "metric", "value", "ci_low", "ci_high", "note")
_V1_FEDERATED_COLUMNS = ("round", "site", "kind", "n", "metric", "value", "note")
METRIC_KINDS = ("train", "validation", "held_out", "held_out_combined", "held_out_combined_sites", "pooled",
                # the selected round's final evaluation (federation.selection best_validation)
                "selected_held_out", "selected_held_out_combined", "selected_pooled",
                # the personalisation wave: global vs personalised on each training site's validation
                "personal_global", "personal_tuned", "personal_global_combined", "personal_tuned_combined")


@dataclass(frozen=True)
class MetricRow:
    """One row of ``metrics.csv``.

    ``unit`` is ``round`` (federated) or ``epoch`` (centralized) and ``step`` its number;
    ``kind`` one of :data:`METRIC_KINDS`; ``site`` the site id, empty for rows that are no single
    site's (centralized runs, combined and pooled metrics); ``task`` empty for the losses and the
    learning rate (``metric`` ``loss`` / ``lr``); ``value`` empty for a suppressed site (fewer than k
    patients), whose ``note`` says so, as it says why a training update was rejected or skipped.
    """

    unit: str
    step: int
    kind: str
    metric: str
    value: float | None = None
    site: str = ""
    n: int | None = None
    task: str = ""
    ci_low: float | None = None
    ci_high: float | None = None
    note: str = ""

    @property
    def name(self) -> str:
        """``task_metric`` (``grade_auc_macro``), or the bare metric for the task-less ones."""
        return f"{self.task}_{self.metric}" if self.task else self.metric

    def to_csv(self) -> dict[str, str]:
        """The row as ``metrics.csv`` cells (empty for None)."""
        return {c: "" if getattr(self, c) is None else str(getattr(self, c)) for c in METRICS_COLUMNS}

    @classmethod
    def from_csv(cls, cells: dict[str, str], where: str) -> MetricRow:
        """Parse a schema-2 row; ``where`` (file and line) names it in errors."""
        return cls(unit=cells["unit"], step=_int(cells["step"], where, "step", required=True), kind=cells["kind"],
                   metric=cells["metric"], value=_float(cells["value"], where, "value"), site=cells["site"],
                   n=_int(cells["n"], where, "n"), task=cells["task"], ci_low=_float(cells["ci_low"], where, "ci_low"),
                   ci_high=_float(cells["ci_high"], where, "ci_high"), note=cells["note"])


def _float(text: str, where: str, column: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise RunDirError(f"{where}: column {column}: {text!r} is not a number") from None


def _int(text: str, where: str, column: str, required: bool = False) -> int | None:
    value = _float(text, where, column)
    if value is None and required:
        raise RunDirError(f"{where}: column {column}: must not be empty")
    if value is not None and value != int(value):
        raise RunDirError(f"{where}: column {column}: {text!r} is not a whole number")
    return None if value is None else int(value)


def metric_rows(unit: str, step: int, kind: str, tasks: dict, site: str = "") -> list[MetricRow]:
    """Rows of every numeric metric of a ``{task: {metric: entry}}`` dict (errors and matrices skipped)."""
    rows = []
    for task, metrics in (tasks or {}).items():
        if not isinstance(metrics, dict):
            continue
        for name, m in metrics.items():
            if has_value(m):
                rows.append(MetricRow(unit, step, kind, name, m["value"], site=site, n=m.get("n"), task=task,
                                      ci_low=m.get("ci_low"), ci_high=m.get("ci_high")))
    return rows


def final_wave_rows(selection: dict | None, personalisation: dict | None) -> list[MetricRow]:
    """``metrics.csv`` rows of what follows the last round: the selected round's held-out
    evaluation (unit ``round``, step = the selected round, kinds ``selected_*``) and the
    personalisation wave (unit ``personalisation``, step = its epochs; per site and combined)."""
    rows: list[MetricRow] = []
    ev = (selection or {}).get("evaluation") or {}
    step = int((selection or {}).get("round") or 0)
    for site, rep in (ev.get("held_out") or {}).items():
        if rep.get("suppressed"):
            rows.append(MetricRow("round", step, "selected_held_out", "", None, site=site, n=rep["n"],
                                  note="suppressed (< k patients)"))
        else:
            rows += metric_rows("round", step, "selected_held_out", rep["tasks"], site=site)
    for kind in ("held_out_combined", "pooled"):
        rows += metric_rows("round", step, f"selected_{kind}", ev.get(kind) or {})
    p = personalisation or {}
    epochs = int(p.get("epochs", 0))
    for site, rep in (p.get("sites") or {}).items():
        if rep.get("suppressed") or "global" not in rep:
            rows.append(MetricRow("personalisation", epochs, "personal_global", "", None, site=site,
                                  n=rep.get("n"), note=rep.get("skipped") or "suppressed (< k patients)"))
            continue
        rows += metric_rows("personalisation", epochs, "personal_global", rep["global"]["tasks"], site=site)
        rows += metric_rows("personalisation", epochs, "personal_tuned", rep["personalised"]["tasks"], site=site)
    for part, kind in (("global", "personal_global_combined"), ("personalised", "personal_tuned_combined")):
        rows += metric_rows("personalisation", epochs, kind, p.get(f"{part}_combined") or {})
    return rows


def combined_note(m: dict) -> str:
    """Why a combined metric used fewer patients than its sites reported: ``n used 157 of 197
    (dropped 27: macro AUC is undefined: ...)``; empty when every reporting site was used."""
    dropped = m.get("dropped") or {}
    if not dropped:
        return ""
    why = "; ".join(f"{site}: {reason}" for site, reason in sorted(dropped.items()))
    return f"n used {m.get('n')} of {m.get('n_reported', m.get('n'))} (dropped {why})"


def combined_rows(unit: str, step: int, tasks: dict) -> list[MetricRow]:
    """Rows of metrics combined over sites: kind ``held_out_combined`` (CI: normal approximation
    from the sites' patient bootstrap; ``note`` the n used and the sites dropped, with why) and,
    where the sites were resampled, ``held_out_combined_sites`` (the same value, CI of the site
    bootstrap)."""
    rows = []
    for row in metric_rows(unit, step, "held_out_combined", tasks):
        m = tasks[row.task][row.metric]
        rows.append(dataclasses.replace(row, note=combined_note(m)))
        if m.get("site_ci_low") is not None:
            rows.append(dataclasses.replace(row, kind="held_out_combined_sites", ci_low=m["site_ci_low"],
                                            ci_high=m["site_ci_high"], note=f"site bootstrap over {m.get('sites')} sites"))
    return rows


def write_metrics(path: str | Path, rows: Iterable[MetricRow]) -> Path:
    """Write ``metrics.csv`` (schema 2) atomically."""
    rows = list(rows)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(METRICS_COLUMNS))
            writer.writeheader()
            writer.writerows(r.to_csv() for r in rows)

    return atomic_write(path, write)


def read_metrics(path: str | Path) -> list[MetricRow]:
    """The rows of a ``metrics.csv`` of schema 2, or of version 1 (converted); a
    :class:`RunDirError` naming the file and the expected columns for any other shape."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunDirError(f"{path}: cannot read it as CSV ({err})") from err
    if not table:
        return []
    header, body = tuple(table[0]), table[1:]
    for i, r in enumerate(body, start=2):
        if r and len(r) != len(header):
            raise RunDirError(f"{path}:{i}: {len(r)} cells, the header has {len(header)} columns (a truncated row?)")
    cells = [(f"{path}:{i}", dict(zip(header, r, strict=True))) for i, r in enumerate(body, start=2) if r]
    if header == METRICS_COLUMNS:
        return [MetricRow.from_csv(c, where) for where, c in cells]
    if header == _V1_FEDERATED_COLUMNS:
        return [_from_v1_federated(c, where) for where, c in cells]
    if header[:1] == ("epoch",) and "train_loss" in header:
        return [row for where, c in cells for row in _from_v1_centralized(c, where)]
    raise RunDirError(
        f"{path}: columns {','.join(header)} are of no metrics.csv schema this umeml reads: schema "
        f"{SCHEMA_VERSION} has {','.join(METRICS_COLUMNS)}; version 1 had {','.join(_V1_FEDERATED_COLUMNS)} "
        "(federated) or epoch,train_loss,lr,... (centralized)")


def _split_name(name: str) -> tuple[str, str]:
    """``grade_auc_macro`` -> (``grade``, ``auc_macro``); task names hold no underscore."""
    task, _, metric = name.partition("_")
    if not metric:
        return "", name
    return task, metric


def _from_v1_federated(c: dict[str, str], where: str) -> MetricRow:
    kind = c["kind"]
    if c["metric"] == "train_loss":
        task, metric = "", "loss"
    else:
        task, metric = _split_name(c["metric"]) if c["metric"] else ("", "")
    site = "" if kind in ("held_out_combined", "pooled") else c["site"]
    return MetricRow("round", _int(c["round"], where, "round", required=True), kind, metric,
                     _float(c["value"], where, "value"), site=site, n=_int(c["n"], where, "n"), task=task,
                     note=c["note"])


def _from_v1_centralized(c: dict[str, str], where: str) -> list[MetricRow]:
    val: dict[str, dict] = {}
    for column, text in c.items():
        if column in ("epoch", "train_loss", "lr", "val_loss") or text == "":
            continue
        if not column.startswith("val_") or "_" not in column[4:]:
            raise RunDirError(f"{where}: column {column!r} is not one of a version-1 centralized metrics.csv "
                              "(epoch, train_loss, lr, val_loss, val_<task>_<metric>)")
        task, metric = _split_name(column[4:])
        val.setdefault(task, {})[metric] = {"value": _float(text, where, column)}
    record = EpochRecord(epoch=_int(c["epoch"], where, "epoch", required=True),
                         train_loss=_float(c.get("train_loss", ""), where, "train_loss"),
                         lr=_float(c.get("lr", ""), where, "lr"), val_loss=_float(c.get("val_loss", ""), where, "val_loss"),
                         val=val)
    return record.metric_rows()


# ------------------------------------------------------------------ records
def _check_keys(cls, payload: Any, what: str) -> dict:
    if not isinstance(payload, dict):
        raise RunDirError(f"{what}: expected a JSON object, got {type(payload).__name__}")
    names = {f.name for f in fields(cls)} - {"extra"}
    missing = [f.name for f in fields(cls) if f.name in getattr(cls, "REQUIRED", ()) and f.name not in payload]
    if missing:
        raise RunDirError(f"{what}: missing field(s) {', '.join(missing)}")
    unknown = [k for k in payload if k not in names]
    if unknown and "extra" not in {f.name for f in fields(cls)}:
        raise RunDirError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return {k: v for k, v in payload.items() if k in names}


def _extra(cls, payload: dict, known: Iterable[str] = ()) -> dict:
    names = {f.name for f in fields(cls)} | set(known)
    return {k: v for k, v in payload.items() if k not in names}


@dataclass
class EpochRecord:
    """One epoch of centralized training: the training loss and learning rate, and the
    validation loss and metrics (``{task: {metric: entry}}``, no CIs) when there is a validation split."""

    epoch: int
    train_loss: float | None = None
    lr: float | None = None
    val_loss: float | None = None
    val: dict = field(default_factory=dict)
    n_train: int | None = None
    n_val: int | None = None

    REQUIRED: ClassVar[tuple[str, ...]] = ("epoch",)

    def to_json(self) -> dict:
        """A JSON-ready dict of every field."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, payload: Any) -> EpochRecord:
        """The record of :meth:`to_json`'s dict (a :class:`RunDirError` when it is not one)."""
        known = _check_keys(cls, payload, "epoch record")
        return cls(**known)

    def metric_rows(self) -> list[MetricRow]:
        """This epoch's ``metrics.csv`` rows."""
        e = self.epoch
        rows = [MetricRow("epoch", e, "train", "loss", self.train_loss, n=self.n_train),
                MetricRow("epoch", e, "train", "lr", self.lr)]
        if self.val_loss is not None:
            rows.append(MetricRow("epoch", e, "validation", "loss", self.val_loss, n=self.n_val))
        return rows + metric_rows("epoch", e, "validation", self.val)


@dataclass
class RoundRecord:
    """One federated round as the coordinator records it (``resume.pt``'s ``history``).

    ``train``: each selected site's training report (``site``, ``train_loss``, ``num-examples``,
    or ``rejected`` / ``skipped`` with the reason); ``evaluation``: ``held_out`` and ``validation``
    per-site reports, their ``*_combined`` metrics and, in a simulation's last round, ``pooled``
    (empty in rounds without evaluation); ``privacy``: the round's ledger entries. Keys this
    version does not know are kept in ``extra`` and written back, so nothing is lost.
    """

    round: int
    train: list[dict] = field(default_factory=list)
    accepted: int = 0
    evaluation: dict = field(default_factory=dict)
    privacy: list[dict] = field(default_factory=list)
    train_wave_seconds: float | None = None
    seconds: float | None = None
    overhead_seconds: float | None = None
    stopped: dict | None = None
    extra: dict = field(default_factory=dict)

    REQUIRED: ClassVar[tuple[str, ...]] = ("round",)

    def to_json(self) -> dict:
        """The history entry (``privacy`` and ``stopped`` only when present, as the coordinator writes it)."""
        out: dict = {"round": self.round, "train": self.train, "accepted": self.accepted, "evaluation": self.evaluation}
        if self.privacy:
            out["privacy"] = self.privacy
        for name in ("train_wave_seconds", "seconds", "overhead_seconds"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.stopped is not None:
            out["stopped"] = self.stopped
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, payload: Any) -> RoundRecord:
        """The record of a history entry (a :class:`RunDirError` when it is not one)."""
        known = _check_keys(cls, payload, "round record")
        return cls(**known, extra=_extra(cls, payload))

    def metric_rows(self) -> list[MetricRow]:
        """This round's ``metrics.csv`` rows: training losses per site, held-out and validation
        metrics per site (a count only for suppressed sites), combined and pooled metrics."""
        r = self.round
        rows = [MetricRow("round", r, "train", "loss", rep.get("train_loss"), site=rep["site"],
                          n=rep.get("num-examples"), note=rep.get("rejected") or rep.get("skipped", ""))
                for rep in self.train]
        ev = self.evaluation
        for kind in ("held_out", "validation"):
            for site, rep in (ev.get(kind) or {}).items():
                if rep.get("suppressed"):
                    rows.append(MetricRow("round", r, kind, "", None, site=site, n=rep["n"],
                                          note="suppressed (< k patients)"))
                else:
                    rows += metric_rows("round", r, kind, rep["tasks"], site=site)
        rows += combined_rows("round", r, ev.get("held_out_combined") or {})
        rows += metric_rows("round", r, "pooled", ev.get("pooled") or {})
        return rows


@dataclass(frozen=True)
class SiteRoles:
    """Which sites of a federated run are held out and which train (``roles.json``).

    Written when the run starts and never changed: a resumed run takes its roles from here, so a
    held-out site can never become a training site by a forgotten or different flag.
    """

    held_out: tuple[str, ...]
    training: tuple[str, ...]

    def to_json(self) -> dict:
        """The ``roles.json`` content."""
        return {"held_out": list(self.held_out), "training": list(self.training)}

    @classmethod
    def from_json(cls, payload: Any, what: str = ROLES_FILE) -> SiteRoles:
        """The roles of a ``roles.json`` payload (a :class:`RunDirError` naming ``what`` otherwise)."""
        known = _check_keys(cls, payload, what)
        for name in ("held_out", "training"):
            value = known.get(name)
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise RunDirError(f"{what}: {name} must be a list of site ids, got {value!r}")
        return cls(tuple(known["held_out"]), tuple(known["training"]))


def read_roles(path: str | Path | RunDir) -> SiteRoles | None:
    """The roles recorded in a run dir (None when it has none: a new run, or one written before
    ``roles.json`` existed, whose ``final.json``, when there is one, still names them)."""
    files = run_dir(path)
    if files.roles.is_file():
        return SiteRoles.from_json(read_json(files.roles), str(files.roles))
    if files.final.is_file():
        payload = read_json(files.final)
        if isinstance(payload, dict) and payload.get("mode") == "federated":
            return SiteRoles(tuple(payload.get("held_out_sites", ())), tuple(payload.get("training_sites", ())))
    return None


def write_roles(path: str | Path | RunDir, roles: SiteRoles, replace: bool = False) -> Path:
    """Record ``roles`` in the run dir, refusing to change roles recorded earlier unless
    ``replace`` (a new run started over an old one's folder)."""
    files = run_dir(path)
    old = read_roles(files) if files.roles.is_file() and not replace else None
    if old is not None and old != roles:
        raise RunDirError(f"{files.roles}: records held-out {list(old.held_out)} and training {list(old.training)}; "
                          f"refusing to change them to held-out {list(roles.held_out)} and training "
                          f"{list(roles.training)}")
    return atomic_write_json(files.roles, roles.to_json())


def _check_version(payload: dict, what: str) -> int:
    version = payload.get("schema_version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RunDirError(f"{what}: schema_version {version!r} is not supported: this umeml reads run directories "
                          f"of schema version {SUPPORTED_SCHEMA_VERSIONS[0]} (no schema_version field) to "
                          f"{SCHEMA_VERSION}; read it with the umeml version that wrote it")
    return int(version)


@dataclass
class _Final:
    """Fields and JSON of both kinds of final result."""

    MODE: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ("experiment",)

    def to_json(self) -> dict:
        """``final.json``'s content: ``schema_version`` first, ``mode`` after ``experiment``."""
        out: dict = {"schema_version": SCHEMA_VERSION}
        for f in fields(self):
            if f.name in ("extra", "schema_version"):
                continue
            out[f.name] = getattr(self, f.name)
            if f.name == "experiment":
                out["mode"] = self.MODE
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, payload: Any, what: str = FINAL_FILE):
        """The record of a ``final.json`` dict of a supported schema version; ``what`` names the
        file in errors. ``schema_version`` holds the version read (1 for files without the field)."""
        if not isinstance(payload, dict):
            raise RunDirError(f"{what}: expected a JSON object, got {type(payload).__name__}")
        version = _check_version(payload, what)
        if payload.get("mode") != cls.MODE:
            raise RunDirError(f"{what}: mode {payload.get('mode')!r} is not {cls.MODE!r}")
        known = _check_keys(cls, payload, what)
        known.pop("schema_version", None)
        return cls(**known, schema_version=version, extra=_extra(cls, payload, ("mode",)))


@dataclass
class CentralizedFinal(_Final):
    """``final.json`` of ``umeml train``: test metrics (``{task: {metric: entry}}`` with bootstrap CIs)."""

    experiment: str = ""
    model: str = ""
    umeml_version: str = ""
    seed: int = 0
    test_sites: list[str] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    best_epoch: int = 0
    epochs_run: int = 0
    wall_seconds: float = 0.0
    test: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    MODE: ClassVar[str] = "centralized"
    REQUIRED: ClassVar[tuple[str, ...]] = ("experiment", "test")


@dataclass
class FederatedFinal(_Final):
    """``final.json`` of a federation: the last evaluation's held-out reports per site, combined
    and (simulation) pooled metrics, time per round, the privacy ledger's summary and why training
    stopped early (None when it did not)."""

    experiment: str = ""
    strategy: str = ""
    model: str = ""
    umeml_version: str = ""
    seed: int = 0
    rounds: int = 0
    held_out_sites: list[str] = field(default_factory=list)
    training_sites: list[str] = field(default_factory=list)
    held_out: dict = field(default_factory=dict)
    held_out_combined: dict = field(default_factory=dict)
    pooled: dict | None = None
    seconds_per_round: list[float] = field(default_factory=list)
    overhead_seconds_per_round: list[float | None] = field(default_factory=list)
    privacy: dict | None = None
    stopped: dict | None = None
    # which round's global weights the held-out metrics are of, and by which rule
    # (umeml.federation.selection); None in runs before the rule existed
    selection: dict | None = None
    # the personalisation wave's record (umeml.federation.personalise); None when not run
    personalisation: dict | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    MODE: ClassVar[str] = "federated"
    REQUIRED: ClassVar[tuple[str, ...]] = ("experiment", "held_out")


FinalResult = Union[CentralizedFinal, FederatedFinal]
_FINALS = {cls.MODE: cls for cls in (CentralizedFinal, FederatedFinal)}


def final_from_json(payload: Any, what: str = FINAL_FILE) -> FinalResult:
    """A ``final.json`` dict as the record of its mode; ``what`` names the file in errors."""
    mode = payload.get("mode") if isinstance(payload, dict) else None
    if mode not in _FINALS:
        raise RunDirError(f"{what}: mode {mode!r} is neither 'federated' nor 'centralized'")
    return _FINALS[mode].from_json(payload, what)


def read_final(path: str | Path | RunDir) -> FinalResult:
    """Read a run's ``final.json`` (a run dir or the file itself)."""
    path = run_dir(path).final if isinstance(path, RunDir) or Path(path).is_dir() else Path(path)
    return final_from_json(read_json(path), str(path))


def write_final(path: str | Path | RunDir, final: FinalResult) -> Path:
    """Write ``final.json`` atomically (a run dir or the file itself)."""
    path = run_dir(path).final if isinstance(path, RunDir) or Path(path).is_dir() else Path(path)
    return atomic_write_json(path, final.to_json())

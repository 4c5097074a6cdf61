"""``umeml report RUN_DIR``: one self-contained ``report.html`` plus ``plots/*.png`` per run.

The run directory decides what the report holds (README, "Reports"):
- a centralized run (``umeml train``) or a federated one (simulation or deployment), from
  ``final.json``, ``metrics.csv``, ``config.yaml``, ``privacy.json`` and, where the writer held
  the patients' data, ``predictions.npz`` (ROC and Kaplan-Meier need per-patient scores, which a
  deployed coordinator never has: its report says so instead of drawing them);
- a comparison (``--compare``: ``comparison.json``) or a folder of runs (``--leave-one-site-out``):
  the modes or runs side by side, with links to each run's own report.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from umeml.errors import UmemlError
from umeml.report import figures
from umeml.report.predictions import HeldOutPredictions, load_predictions
from umeml.rundir import (
    FINAL_FILE,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    PRIMARY_METRICS,
    REPORT_FILE,
    CentralizedFinal,
    FederatedFinal,
    FinalResult,
    MetricRow,
    RunDir,
    RunDirError,
    atomic_write_text,
    combined_note,
    format_metric,
    has_value,
    metric_entry,
    read_final,
    read_json,
    read_metrics,
)

log = logging.getLogger(__name__)
PACKAGES = ("umeml", "torch", "numpy", "flwr", "opacus", "lifelines", "matplotlib", "h5py", "openslide-python")


class ReportError(UmemlError):
    """The run directory cannot be reported on (missing or unreadable files)."""


@dataclass
class Section:
    """One part of the page: a heading, HTML text and figures (file name, caption)."""

    title: str
    body: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Options:
    """What to draw beyond the run dir's own files."""

    risk_groups: str = "median"
    slide: Path | None = None
    features: Path | None = None
    checkpoint: Path | None = None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class ReportBuilder:
    """Collects sections and figures for one run dir and writes the page."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.files = RunDir(run_dir)
        self.plots = self.files.plots
        self.sections: list[Section] = []
        self.notes: list[str] = []
        self.titles: dict[str, list[list[float]]] = {}  # image -> [x0, x1, y0, y1] of each title, PNG pixels

    def save(self, fig, name: str) -> str:
        """Save ``fig`` as ``plots/<name>.png``; returns the file name. The titles' pixel extents
        are kept for the page (``data-title-px`` on the image, checked by the browser test) and a
        title cut off by the figure's edge is logged."""
        self.plots.mkdir(parents=True, exist_ok=True)
        extents = figures.save_png(fig, self.plots / f"{name}.png")
        self.titles[f"{name}.png"] = [[round(t[k], 1) for k in ("x0", "x1", "y0", "y1")] for t in extents]
        for text in figures.clipped_titles(fig, extents=extents):  # the saved figure's, not drawn again
            log.warning("%s: the title %r is wider than the figure and is cut off", name, text)
        return f"{name}.png"

    def write(self, title: str, subtitle: str) -> Path:
        """Write ``report.html`` with every image embedded as a data URI."""
        parts = [f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"]
        toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(self.sections))
        parts.append(f"<nav><ol>{toc}</ol></nav>")
        for i, s in enumerate(self.sections):
            parts.append(f"<section id='s{i}'><h2>{html.escape(s.title)}</h2>{s.body}<div class='figs'>")
            for name, caption in s.figures:
                data = base64.b64encode((self.plots / name).read_bytes()).decode("ascii")
                title_px = html.escape(json.dumps(self.titles.get(name, [])))
                parts.append(f"<figure><img alt='{html.escape(caption)}' data-title-px='{title_px}' "
                             f"src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(caption)} <code>{PLOTS_DIR}/{html.escape(name)}</code>"
                             "</figcaption></figure>")
            parts.append("</div></section>")
        if self.notes:
            parts.append("<section><h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
                         + "</ul></section>")
        page = PAGE.format(title=html.escape(title), body="\n".join(parts))
        return atomic_write_text(self.files.report, page)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }}
h1 {{ margin-bottom: 0.1em; }} .sub {{ color: #555; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f2f2f2; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
figure {{ margin: 0.5em 0; flex: 1 1 520px; max-width: 100%; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #444; font-size: 0.9em; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
.ok {{ color: #176b2c; font-weight: bold; }} .bad {{ color: #a11; font-weight: bold; }}
</style></head>
<body>
{body}
</body></html>
"""


# ------------------------------------------------------------------ pieces shared by run kinds
def _config_section(run_dir: Path, run_version: str | None) -> Section:
    cfg = RunDir(run_dir).config
    text = cfg.read_text() if cfg.is_file() else "(config.yaml not found)"
    versions = _versions()
    if run_version:
        versions["umeml (at run time)"] = str(run_version)
    rows = [[k, v] for k, v in versions.items()]
    return Section("Configuration and versions",
                   _table(["package", "version"], rows) + f"<pre>{html.escape(text)}</pre>")


def _metrics_table(named: dict[str, dict], n: dict[str, int]) -> str:
    """Rows = names (sites, combined, pooled), columns = every task metric present."""
    cols: list[tuple[str, str]] = []
    for tasks in named.values():
        for task, metrics in (tasks or {}).items():
            for metric, m in (metrics or {}).items():
                if isinstance(m, dict) and "value" in m and not isinstance(m["value"], list) and (task, metric) not in cols:
                    cols.append((task, metric))
    rows = []
    for name, tasks in named.items():
        rows.append([name, str(n.get(name, "-"))] + [format_metric(metric_entry(tasks, t, k)) for t, k in cols])
    return _table(["", "n"] + [f"{t} {k}" for t, k in cols], rows)


def _forest_section(builder: ReportBuilder, per_site: dict[str, tuple[dict, int]], summaries: dict[str, tuple[dict, int]],
                    what: str, federated: bool = True) -> Section | None:
    # the privacy threshold k applies to what sites report to a coordinator, not to a centralized run
    k_rule = " Sites below the privacy threshold k report only their count and are absent." if federated else ""
    sec = Section("Per-site metrics (forest plot)",
                  f"<p>{html.escape(what)} Each marker is a site's metric with its 95% bootstrap CI; diamonds "
                  f"are the summaries.{k_rule}</p>")
    for task, metric in PRIMARY_METRICS:
        rows = []
        for label, (tasks, n) in list(per_site.items()) + list(summaries.items()):
            m = metric_entry(tasks, task, metric)
            if has_value(m):
                rows.append({"label": label, "value": m["value"], "low": m.get("ci_low"), "high": m.get("ci_high"),
                             "n": m.get("n", n), "kind": "summary" if label in summaries else "site"})
        if rows:
            name = builder.save(figures.forest_plot(rows, figures.metric_label(task, metric)), f"forest_{task}")
            sec.figures.append((name, f"{figures.metric_label(task, metric)} per site."))
    return sec if sec.figures else None


def _prediction_sections(builder: ReportBuilder, preds: HeldOutPredictions, opts: Options, who: str,
                         short: str) -> list[Section]:
    """ROC, confusion and Kaplan-Meier sections of the patients ``who`` describes (``short``: the
    same in a few words, for the figures' titles)."""
    out = []
    roc = Section("ROC curves", f"<p>One-vs-rest ROC per class, n={len(preds)}: {html.escape(who)}.</p>")
    conf = Section("Confusion matrices", f"<p>Arg-max predictions on {html.escape(who)}.</p>")
    from umeml.metrics.classification import confusion_matrix

    for task, probs in preds.probs.items():
        classes = preds.classes[task]
        roc.figures.append((builder.save(figures.roc_curves(task, probs, preds.labels[task], classes), f"roc_{task}"),
                            f"{figures.TASK_LABELS.get(task, task)}: ROC per class, AUC and positives in the legend."))
        cm = confusion_matrix(preds.labels[task], probs.argmax(axis=1), len(classes))
        conf.figures.append((builder.save(figures.confusion_matrix(task, cm, classes, short), f"confusion_{task}"),
                             f"{figures.TASK_LABELS.get(task, task)}: confusion matrix."))
    out += [s for s in (roc, conf) if s.figures]
    if preds.risk is not None and len(preds) >= 2:
        fig, test = figures.kaplan_meier(preds.months, preds.censored, preds.risk, opts.risk_groups)
        p = "not computable" if test.get("p_value") is None else f"{test['p_value']:.3g}"
        body = (f"<p>Patients: {html.escape(who)}, split at the {html.escape(opts.risk_groups)} of their own "
                f"predicted risk (risk = minus the sum of the predicted survival curve). Log-rank test p = {p}"
                + (f" (chi-square {test['statistic']:.2f}, {test['df']} df)" if test.get("statistic") is not None else "")
                + ". Shaded bands: 95% CIs of the Kaplan-Meier estimates; ticks: censored patients.</p>")
        out.append(Section("Kaplan-Meier curves by predicted risk", body,
                           [(builder.save(fig, "kaplan_meier"), "Survival of held-out patients by predicted risk group.")]))
    return out


def _total_epsilon_table(totals: dict) -> str:
    """One total epsilon per site (every release of the run composed) with the releases listed."""
    if not totals:
        return ""
    rows = []
    for site, t in sorted(totals.items()):
        listed = "; ".join(f"{r.get('kind')}: epsilon {r.get('epsilon_alone', 0):.3g}"
                           + (f" ({r['steps']} steps in {r['rounds']} rounds)" if "steps" in r else "")
                           for r in t.get("releases", []))
        rows.append([site, f"{t['epsilon']:.3f}", t.get("delta"), listed or "-"])
    return ("<p>Total epsilon per site: every release of this run at the site (DP-SGD, survival histogram, "
            "class counts, genomic moments) composed in Renyi DP (or by basic composition where that is "
            "smaller).</p>"
            + _table(["site", "total epsilon", "delta", "releases (each alone)"], rows))


def _eps3(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def _local_row(site: str, e: dict) -> list:
    """A site's last DP-SGD entry: DP-SGD's epsilon alone and the total its budget bounds."""
    target = e.get("target_epsilon")
    return [site, e.get("round"), _eps3(e.get("epsilon")), _eps3(e.get("epsilon_total")),
            target if target is not None else "-", e.get("delta"), e.get("status")]


def _budget_statement(site: str, e: dict) -> str | None:
    """"site X: total epsilon ... <= its budget" (the total: DP-SGD with the site's one-off
    releases; DP-SGD's alone for ledgers written before releases were accounted)."""
    total = e.get("epsilon_total") if isinstance(e.get("epsilon_total"), (int, float)) else e.get("epsilon")
    target = e.get("target_epsilon")
    if not (isinstance(total, (int, float)) and isinstance(target, (int, float))):
        return None
    ok = total <= target + 1e-9
    what = "total epsilon" if isinstance(e.get("epsilon_total"), (int, float)) else "final epsilon"
    return (f"<li class='{'ok' if ok else 'bad'}'>site {html.escape(site)}: {what} {total:.3f} "
            f"{html.escape('<=' if ok else '>')} its budget {target:g} (delta {e.get('delta')})</li>")


def _privacy_section(builder: ReportBuilder, ledger: dict) -> Section:
    entries = ledger.get("entries", [])
    final = ledger.get("final", {})
    rows, statements = [], []
    for site, e in sorted((final.get("local") or {}).items()):
        rows.append(_local_row(site, e))
        statement = _budget_statement(site, e)
        if statement:
            statements.append(statement)
    central = final.get("central")
    if central:
        rows.append(["(central)", central.get("round"), f"{central['epsilon']:.3f}", "-", "-", central.get("delta"),
                     "released"])
    targets = {}
    for e in (final.get("local") or {}).values():
        if isinstance(e.get("target_epsilon"), (int, float)):
            targets.setdefault(f"{e['target_epsilon']:g}", e["target_epsilon"])
    releases, notes = _releases_and_notes(ledger)
    stopped = ledger.get("stopped") or final.get("stopped")
    body = ("<p>Cumulative epsilon per site from each site's own accountant (local DP-SGD, per patient; the "
            "total adds the site's one-off releases) and, "
            "for central DP, of the aggregate (per site). Values are read from <code>privacy.json</code>.</p>"
            + _total_epsilon_table(final.get("total") or {})
            + (f"<ul>{''.join(statements)}</ul>" if statements else "")
            + (_table(["site", "last round", "epsilon (DP-SGD)", "epsilon total (DP-SGD + releases, budget scope)",
                       "target epsilon", "delta", "status"], rows) if rows
               else "<p>No DP-SGD training entries (neither local nor central DP was on).</p>")
            + (f"<p>One-off releases:</p><ul>{releases}</ul>" if releases else "")
            + _preprocessing_notes(ledger)
            + (f"<p class='bad'>Training stopped: {html.escape(json.dumps(stopped))}</p>" if stopped else "")
            + (f"<p>About the ledger:</p><ul>{notes}</ul>" if notes else ""))
    sec = Section("Privacy ledger", body)
    if entries:
        sec.figures.append((builder.save(figures.privacy_epsilon(entries, {f"{v:g}": v for v in targets.values()}),
                                         "privacy_epsilon"), "Cumulative epsilon by round."))
    return sec


def _preprocessing_notes(ledger: dict) -> str:
    """How the coordinator combined the sites' (noisy) statistics: floors, shrinkage, fallbacks.
    A reader judging the class weights or the genomic scale needs them next to the releases."""
    notes = [str(n) for n in ledger.get("preprocessing_notes") or []]
    if not notes:
        return ""
    return ("<p>How the coordinator combined the training sites' statistics (costs no privacy):</p><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")


def _release_epsilon(r: dict) -> str:
    """A release's epsilon as listed; per site where the sites used different ones ("auto" scales
    with each site's own total)."""
    eps = r.get("epsilon")
    text = f"{eps:.3g}" if isinstance(eps, float) else str(eps)
    by_site = r.get("epsilon_by_site") or {}
    if len(set(by_site.values())) > 1:
        text += " (the largest; " + ", ".join(f"{s}: {e:.3g}" if isinstance(e, float) else f"{s}: {e}"
                                              for s, e in sorted(by_site.items())) + ")"
    return text


def _releases_and_notes(ledger: dict) -> tuple[str, str]:
    """HTML items of the one-off releases and of the ledger's notes. A note that explains a kind of
    release (``survival_histogram: ...``) goes with that release: listed right under "One-off
    releases" as a second item, it read as the same release listed twice."""
    notes = [str(n) for n in ledger.get("notes", [])]
    items = []
    for r in ledger.get("releases", []):
        kind = str(r.get("kind", "release"))
        about = [n[len(kind) + 1:].strip() for n in notes if n.startswith(f"{kind}:")]
        notes = [n for n in notes if not n.startswith(f"{kind}:")]
        site = f" (site {r['site']})" if r.get("site") else ""
        items.append(f"<li>{html.escape(kind + site)}: epsilon {html.escape(_release_epsilon(r))}, "
                     f"delta {r.get('delta')}"
                     + (f" ({html.escape(str(r['mechanism']))})" if r.get("mechanism") else "")
                     + "".join(f". {html.escape(a[:1].upper() + a[1:])}" for a in about) + "</li>")
    return "".join(items), "".join(f"<li>{html.escape(n)}</li>" for n in notes)


def _read_metrics(run_dir: Path) -> list[MetricRow]:
    path = RunDir(run_dir).metrics
    return read_metrics(path) if path.is_file() else []


def _num(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None


# ------------------------------------------------------------------ run kinds
def _federated_curves(rows: list[MetricRow]) -> tuple[dict, dict]:
    train: dict[str, list] = {}
    by_round: dict[int, list[tuple[float, int]]] = {}
    held: dict[str, dict[str, list]] = {}
    for r in rows:
        rnd, v = r.step, _num(r.value)
        if v is None:
            continue
        n = r.n or 0
        if r.kind == "train" and r.name == "loss":
            train.setdefault(r.site, []).append((rnd, v, n))
            by_round.setdefault(rnd, []).append((v, n))
        elif r.kind in ("held_out", "held_out_combined") and (r.task, r.metric) in PRIMARY_METRICS:
            name = "combined" if r.kind == "held_out_combined" else f"{r.site} (n={n})"
            held.setdefault(r.name, {}).setdefault(name, []).append((rnd, v))
    train["weighted mean"] = [(rnd, sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)), sum(n for _, n in vals))
                              for rnd, vals in sorted(by_round.items())]
    return train, held


def _federated(builder: ReportBuilder, final: FederatedFinal, opts: Options) -> None:
    held = final.held_out or {}
    per_site = {s: (r.get("tasks"), r.get("n")) for s, r in held.items() if not r.get("suppressed")}
    suppressed = [s for s, r in held.items() if r.get("suppressed")]
    named = {s: t for s, (t, _) in per_site.items()}
    n = {s: c for s, (_, c) in per_site.items()}
    summaries: dict[str, tuple[dict, int]] = {}
    if final.held_out_combined:
        total = sum(c or 0 for c in n.values())
        summaries["combined over sites"] = (final.held_out_combined, total)
        by_sites = _site_bootstrap_view(final.held_out_combined)
        if by_sites:
            summaries["combined, CI resampling sites"] = (by_sites, total)
    if final.pooled:
        summaries["pooled (simulation)"] = (final.pooled, sum(c or 0 for c in n.values()))
    named.update({k: v for k, (v, _) in summaries.items()})
    n.update({k: c for k, (_, c) in summaries.items()})
    body = (f"<p>{final.rounds} rounds of {html.escape(str(final.strategy))}, model "
            f"{html.escape(str(final.model))}; training sites {html.escape(', '.join(final.training_sites))}; "
            f"held-out sites {html.escape(', '.join(final.held_out_sites))}. Metrics with 95% CIs (bootstrap per "
            "site; normal approximation for the combination weighted by n, the c-index by comparable pairs).</p>"
            + _metrics_table(named, n))
    if suppressed:
        body += f"<p>Suppressed (fewer than k patients, count only): {html.escape(', '.join(suppressed))}.</p>"
    body += _combined_notes(builder, final.held_out_combined or {})
    spr = final.seconds_per_round or []
    if spr:
        body += f"<p>Seconds per round: mean {np.mean(spr):.1f} (min {min(spr):.1f}, max {max(spr):.1f}).</p>"
    builder.sections.append(Section("Held-out metrics", body))
    rows = _read_metrics(builder.run_dir)
    if rows:
        train, held_series = _federated_curves(rows)
        fig = figures.round_curves(train, held_series, "round")
        builder.sections.append(Section("Training curves", "<p>Training loss per site and round (mean over the "
                                        "site's local steps) and held-out metrics per round.</p>",
                                        [(builder.save(fig, "curves"), "Per-round training loss and held-out metrics.")]))
    forest = _forest_section(builder, per_site, summaries, "Held-out sites of the federation.")
    if forest:
        builder.sections.append(forest)
    preds_path = builder.files.predictions
    if preds_path.is_file():
        builder.sections += _prediction_sections(builder, load_predictions(preds_path), opts,
                                                 "all held-out patients, pooled over the held-out sites (a simulation "
                                                 "keeps their predictions)", "held-out patients pooled")
    else:
        builder.notes.append("No ROC or Kaplan-Meier curves: they need per-patient predictions, which never leave a "
                             "site in a deployment (only a simulation or centralized run keeps predictions.npz).")
        conf = _summed_confusions(builder, held)
        if conf:
            builder.sections.append(conf)


def _site_bootstrap_view(combined: dict) -> dict:
    """The combined metrics with the site bootstrap's CI in place of the normal approximation's."""
    out: dict = {}
    for task, metrics in combined.items():
        for name, m in (metrics.items() if isinstance(metrics, dict) else ()):
            if has_value(m) and m.get("site_ci_low") is not None:
                out.setdefault(task, {})[name] = {"value": m["value"], "ci_low": m["site_ci_low"],
                                                  "ci_high": m["site_ci_high"], "n": m.get("n")}
    return out


def _combined_notes(builder: ReportBuilder, combined: dict) -> str:
    """What the combined metrics used: n and dropped sites per metric, classes no site has."""
    from umeml.metrics.coverage import missing_class_messages

    items = []
    for task, metrics in combined.items():
        for name, m in (metrics.items() if isinstance(metrics, dict) else ()):
            if has_value(m) and combined_note(m):
                items.append(f"combined {task} {name}: {combined_note(m)}")
    items += missing_class_messages(combined, _config_classes(builder.run_dir), "the held-out sites reporting metrics")
    text = ("<p>Combined over sites: the patient-based CI is a normal approximation from the sites' own bootstrap "
            "CIs; " + ("the row <i>combined, CI resampling sites</i> resamples the sites instead (how the metric would "
                       "move with other hospitals; coarse with few sites).</p>" if _site_bootstrap_view(combined) else
                       "a site bootstrap (resampling sites) needs at least two held-out sites reporting.</p>"))
    return text + ("<ul>" + "".join(f"<li class='bad'>{html.escape(i)}</li>" for i in items) + "</ul>" if items else "")


def _summed_confusions(builder: ReportBuilder, held: dict) -> Section | None:
    """Confusion matrices summed over held-out sites: counts every site reports at >= k patients."""
    cfg = _config_classes(builder.run_dir)
    sec = Section("Confusion matrices", "<p>Summed over the held-out sites' reported matrices.</p>")
    for task in ("grade", "subtype"):
        mats = [np.asarray(r["tasks"][task]["confusion_matrix"]["value"]) for r in held.values()
                if not r.get("suppressed") and "confusion_matrix" in (r.get("tasks", {}).get(task) or {})]
        if mats and task in cfg:
            fig = figures.confusion_matrix(task, np.sum(mats, axis=0), cfg[task], "held-out sites summed")
            sec.figures.append((builder.save(fig, f"confusion_{task}"), f"{figures.TASK_LABELS[task]}: confusion matrix."))
    return sec if sec.figures else None


def _config_classes(run_dir: Path) -> dict[str, list[str]]:
    from umeml.config import load_config
    from umeml.data.labels import subtype_codes

    try:
        cfg = load_config(RunDir(run_dir).config)
    except Exception as err:  # noqa: BLE001 - a report without class names is still a report; say why
        log.warning("%s: class names unavailable (%s)", RunDir(run_dir).config, err)
        return {}
    return {"grade": list(cfg.data.grades), "subtype": list(subtype_codes(cfg.data))}


def _centralized(builder: ReportBuilder, final: CentralizedFinal, opts: Options) -> None:
    body = (f"<p>Model {html.escape(str(final.model))} trained centrally on {final.n_train} patients "
            f"(validation {final.n_val}), best epoch {final.best_epoch} of {final.epochs_run}; "
            f"test sites {html.escape(', '.join(final.test_sites))} (n={final.n_test}).</p>"
            + _metrics_table({"test": final.test}, {"test": final.n_test}))
    builder.sections.append(Section("Test metrics", body))
    rows = _read_metrics(builder.run_dir)
    if rows:
        train, held = _central_curves(rows, final)
        fig = figures.round_curves(train, held, "epoch")
        builder.sections.append(Section("Training curves", "<p>Loss on the training and validation splits and "
                                        "validation metrics per epoch.</p>",
                                        [(builder.save(fig, "curves"), "Per-epoch loss and validation metrics.")]))
    preds_path = builder.files.predictions
    if preds_path.is_file():
        preds = load_predictions(preds_path)
        forest = _forest_section(builder, _site_metrics(preds, final),
                                 {"all test sites": (final.test, final.n_test)},
                                 "Test sites of the centralized run.", federated=False)
        if forest:
            builder.sections.append(forest)
        builder.sections += _prediction_sections(builder, preds, opts, "the patients of the test sites", "test sites")
    else:
        builder.notes.append(f"{PREDICTIONS_FILE} is absent: no ROC, confusion or Kaplan-Meier plots.")


def _central_curves(rows: list[MetricRow], final: CentralizedFinal) -> tuple[dict, dict]:
    """Per-epoch training and validation loss, and the validation primary metrics."""
    def losses(kind: str, n: int) -> list:
        return [(r.step, _num(r.value), n) for r in rows
                if r.kind == kind and r.name == "loss" and _num(r.value) is not None]

    train = {"train": losses("train", final.n_train or 0), "validation": losses("validation", final.n_val or 0)}
    held = {}
    for task, metric in PRIMARY_METRICS:
        pts = [(r.step, _num(r.value)) for r in rows if r.kind == "validation" and (r.task, r.metric) == (task, metric)]
        pts = [(e, v) for e, v in pts if v is not None]
        if pts:
            held[f"{task}_{metric}"] = {f"validation (n={final.n_val})": pts}
    return train, held


def _site_metrics(preds: HeldOutPredictions, final: CentralizedFinal) -> dict[str, tuple[dict, int]]:
    """Per test site metrics with bootstrap CIs, from the saved predictions."""
    from umeml.metrics.classification import classification_metrics
    from umeml.metrics.survival import survival_metrics

    out = {}
    sites = sorted(set(preds.sites.tolist()))
    if len(sites) < 2:
        return out
    for site in sites:
        sel = preds.sites == site
        tasks = {}
        for task, probs in preds.probs.items():
            try:
                tasks[task] = classification_metrics(preds.labels[task][sel], probs[sel], n_boot=200, seed=0)
            except ValueError as err:
                log.info("site %s %s: %s", site, task, err)
        if preds.risk is not None:
            try:
                tasks["survival"] = survival_metrics(preds.months[sel], preds.censored[sel], preds.risk[sel], n_boot=200, seed=0)
            except ValueError as err:
                log.info("site %s survival: %s", site, err)
        out[site] = (tasks, int(sel.sum()))
    return out


def _comparison(builder: ReportBuilder, summary: dict) -> None:
    results = {mode: r["test"] for mode, r in summary["results"].items()}
    n = {mode: r.get("n") for mode, r in summary["results"].items()}
    body = (f"<p>Held-out sites {html.escape(', '.join(summary.get('held_out_sites', [])))}; training sites "
            f"{html.escape(', '.join(summary.get('training_sites', [])))}. Centralized pools the training sites' data "
            "(the ceiling nobody may reach in practice), federated trains across them with umeml, local-only trains "
            "on one site alone. All modes are tested on the same held-out patients.</p>"
            + _metrics_table(results, n) + _links(builder.run_dir))
    fig = figures.comparison(results, n)
    builder.sections.append(Section("Centralized vs federated vs local-only", body,
                                    [(builder.save(fig, "comparison"), "Primary metrics per mode with 95% CIs.")]))


def _links(run_dir: Path) -> str:
    subs = sorted(p.parent for p in run_dir.glob(f"*/{REPORT_FILE}"))
    if not subs:
        return ""
    return "<p>Reports of the individual runs: " + ", ".join(
        f"<a href='{html.escape(p.name)}/{REPORT_FILE}'>{html.escape(p.name)}</a>" for p in subs) + ".</p>"


def _collection(builder: ReportBuilder, runs: dict[str, FinalResult]) -> None:
    per_run = {}
    for name, final in runs.items():
        if isinstance(final, FederatedFinal):
            tasks = final.pooled or final.held_out_combined or {}
            n = sum((r.get("n") or 0) for r in (final.held_out or {}).values())
            sites = final.held_out_sites
        else:
            tasks, n, sites = final.test or {}, final.n_test, final.test_sites
        per_run[f"{name} ({', '.join(sites or [])})"] = (tasks, n)
    body = ("<p>One run per held-out site (leave-one-site-out); each row is tested on the named site only.</p>"
            + _metrics_table({k: t for k, (t, _) in per_run.items()}, {k: c for k, (_, c) in per_run.items()})
            + _links(builder.run_dir))
    builder.sections.append(Section("Runs", body))
    forest = _forest_section(builder, per_run, {}, "Each run's held-out site.")
    if forest:
        builder.sections.append(forest)


def _heatmap_checkpoint(builder: ReportBuilder, opts: Options) -> Path:
    """The heatmap's checkpoint, once every input it needs is there (checked before any plot)."""
    checkpoint = opts.checkpoint
    if checkpoint is None:
        for cand in (builder.files.global_checkpoint, builder.files.best_checkpoint):
            if cand.is_file():
                checkpoint = cand
                break
    if checkpoint is None:
        raise ReportError(f"{builder.run_dir}: no checkpoints/global.pt or best.pt for the heatmap (give --checkpoint)")
    if opts.features is None:
        raise ReportError("--slide needs --features (the slide's h5 feature bag)")
    for path, flag in ((opts.slide, "--slide"), (opts.features, "--features"), (checkpoint, "--checkpoint")):
        if not Path(path).is_file():
            raise ReportError(f"{flag} {path}: no such file")
    return Path(checkpoint)


def _heatmap_figure(opts: Options, checkpoint: Path):
    """The slide heatmap's figure; a slide, bag or checkpoint it cannot use is a ReportError."""
    from umeml.report.heatmap import prototype_heatmap

    try:
        return prototype_heatmap(opts.slide, opts.features, checkpoint)
    except ValueError as err:
        raise ReportError(str(err)) from err


def _heatmap(builder: ReportBuilder, opts: Options, checkpoint: Path, fig) -> None:
    builder.sections.append(Section(
        "Prototype attention on a slide",
        f"<p>Soft assignment of each patch of <code>{html.escape(Path(opts.slide).name)}</code> to the model's "
        "prototypes (softmax over prototypes of the cosine similarity, design section 5), painted at the patch's "
        f"position on the slide thumbnail. Checkpoint <code>{html.escape(str(checkpoint))}</code>.</p>",
        [(builder.save(fig, "prototype_heatmap"), "Prototype attention over the slide thumbnail.")]))


def write_report(run_dir: str | Path, options: Options | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the page's path.

    Raises :class:`ReportError` naming the file when the run dir holds nothing to report on
    or a file of it cannot be read (unreadable, of an unknown schema version).
    """
    run_dir = Path(run_dir)
    opts = options or Options()
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    builder = ReportBuilder(run_dir)
    # a missing or unusable heatmap input (a bag of another feature dimension) is said before the
    # plots are drawn (seconds of work otherwise)
    checkpoint = _heatmap_checkpoint(builder, opts) if opts.slide is not None else None
    heatmap = _heatmap_figure(opts, checkpoint) if checkpoint is not None else None
    t0 = time.perf_counter()
    try:
        title, sub, run_version = _run_sections(builder, opts, time.strftime("%Y-%m-%d %H:%M %Z"))
        if builder.files.privacy.is_file():
            builder.sections.append(_privacy_section(builder, read_json(builder.files.privacy)))
    except RunDirError as err:
        raise ReportError(str(err)) from err
    if heatmap is not None:
        _heatmap(builder, opts, checkpoint, heatmap)
    builder.sections.append(_config_section(run_dir, run_version))
    out = builder.write(title, sub)
    log.info("report written in %.1f s: %s", time.perf_counter() - t0, out)
    return out


def _run_sections(builder: ReportBuilder, opts: Options, created: str) -> tuple[str, str, str | None]:
    """The sections of the run dir's kind (comparison, one run, a folder of runs); returns the
    page's title and subtitle and the umeml version the run was written with (None for folders)."""
    files = builder.files
    name = files.root.name
    if files.comparison.is_file():
        _comparison(builder, read_json(files.comparison))
        return f"umeml comparison: {name}", f"centralized vs federated vs local-only; written {created}", None
    if files.final.is_file():
        final = read_final(files)
        if isinstance(final, FederatedFinal):
            _federated(builder, final, opts)
        else:
            _centralized(builder, final, opts)
        return f"umeml {final.MODE} run: {final.experiment or name}", f"{files.root} - written {created}", final.umeml_version
    runs = {p.parent.name: read_final(p) for p in sorted(files.root.glob(f"*/{FINAL_FILE}"))}
    if not runs:
        raise ReportError(f"{files.root}: no final.json, comparison.json or runs with a final.json below it "
                          "(is the run finished?)")
    _collection(builder, runs)
    return f"umeml runs in {name}", f"{len(runs)} runs - written {created}", None

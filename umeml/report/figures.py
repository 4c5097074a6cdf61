"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no GUI).

Each function takes plain data and returns a :class:`matplotlib.figure.Figure`; the caller saves
it. Axes carry labels with units, legends carry the n of every group.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from umeml.rundir import PRIMARY_METRICS, has_value, metric_entry, metrics_of_tasks

METRIC_LABELS = {
    "auc_macro": "macro one-vs-rest AUC",
    "auc_micro": "micro AUC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "c_index": "Harrell's c-index",
}
TASK_LABELS = {"grade": "WHO grade", "subtype": "histological subtype", "survival": "survival"}


def metric_label(task: str, metric: str) -> str:
    """A human name such as 'WHO grade: macro one-vs-rest AUC'."""
    return f"{TASK_LABELS.get(task, task)}: {METRIC_LABELS.get(metric, metric)}"


def title_extents(fig: Figure) -> list[dict]:
    """Where every title of ``fig`` lands in its saved PNG, in pixels from the left and from the
    top: ``[{"text", "x0", "x1", "y0", "y1"}]`` (the axes' titles: the report's figures use
    no other title).

    Drawn once with the Agg renderer at the figure's own dpi, as ``savefig`` draws it (the report
    saves at that dpi, without ``bbox_inches``), so the constrained layout is the saved one.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    height = fig.bbox.height
    out = []
    for t in (ax.title for ax in fig.axes if ax.get_visible()):
        if not t.get_text() or not t.get_visible():
            continue
        box = t.get_window_extent(renderer)
        out.append({"text": t.get_text(), "x0": float(box.x0), "x1": float(box.x1),
                    "y0": float(height - box.y1), "y1": float(height - box.y0)})
    return out


def save_png(fig: Figure, path) -> list[dict]:
    """Write ``fig`` to ``path`` as ``fig.savefig(path)`` writes it (Agg at the figure's dpi, no
    ``bbox_inches``) and return its :func:`title_extents`, drawing the figure once for both:
    drawing is most of a report's time, and savefig would draw it again."""
    from matplotlib.image import imsave

    extents = title_extents(fig)  # draws fig on its Agg canvas
    imsave(path, fig.canvas.buffer_rgba(), format="png", origin="upper", dpi=fig.dpi)
    return extents


def clipped_titles(fig: Figure, tolerance: float = 0.5, extents: list[dict] | None = None) -> list[str]:
    """Titles of ``fig`` that stick out of the figure (and so are cut off in the PNG). ``extents``:
    :func:`title_extents` of ``fig`` where the caller has them (each call draws the figure)."""
    w, h = fig.bbox.width, fig.bbox.height
    return [t["text"] for t in (title_extents(fig) if extents is None else extents)
            if t["x0"] < -tolerance or t["x1"] > w + tolerance or t["y0"] < -tolerance or t["y1"] > h + tolerance]


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def round_curves(train_loss: dict[str, list[tuple[int, float, int]]],
                 held_out: dict[str, dict[str, list[tuple[int, float]]]], x_label: str = "round") -> Figure:
    """Training loss and held-out metrics per round (federated) or epoch (centralized).

    ``train_loss``: series name -> [(x, loss, n)]; ``held_out``: "task_metric" -> series name ->
    [(x, value)]. Each metric gets its own panel; series are sites (thin) and combined (thick).
    """
    panels = 1 + len(held_out)
    cols = min(panels, 2)
    rows = -(-panels // cols)
    fig = _figure(6.0 * cols, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    ax = axes[0]
    for name, pts in sorted(train_loss.items()):
        if not pts:
            continue
        xs, ys, ns = zip(*pts)
        n_label = f"n={max(ns)}" if any(ns) else ""
        thick = name in ("mean", "train", "weighted mean")
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, lw=2.2 if thick else 1.0,
                alpha=1.0 if thick else 0.7, label=f"{name} ({n_label})" if n_label else name)
    ax.set(title="training loss", xlabel=x_label, ylabel="loss (NLL + CE, per patient)")
    ax.legend(fontsize=7, loc="best")
    for ax, (key, series) in zip(axes[1:], sorted(held_out.items())):
        task, metric = key.split("_", 1)
        for name, pts in sorted(series.items()):
            if not pts:
                continue
            xs, ys = zip(*pts)
            thick = name.startswith("combined") or name.startswith("validation")
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, lw=2.2 if thick else 1.0,
                    alpha=1.0 if thick else 0.8, label=name)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=metric_label(task, metric), xlabel=x_label, ylabel=METRIC_LABELS.get(metric, metric),
               ylim=(0.0, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[:panels]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig


def roc_curves(task: str, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> Figure:
    """One-vs-rest ROC curve per class with its AUC and number of positives."""
    from umeml.metrics.classification import binary_auc, roc_curve

    fig = _figure(5.6, 5.0)
    ax = fig.subplots()
    n = len(labels)
    for k, name in enumerate(classes):
        positive = labels == k
        if positive.all() or not positive.any():
            ax.plot([], [], " ", label=f"{name}: n+={int(positive.sum())}, no ROC (one class only)")
            continue
        fpr, tpr = roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, lw=1.6, label=f"{name}: AUC {binary_auc(positive, probs[:, k]):.3f} (n+={int(positive.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate (sensitivity)",
           title=f"{TASK_LABELS.get(task, task)}: one-vs-rest ROC (n={n})", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def confusion_matrix(task: str, matrix: np.ndarray, classes: list[str], source: str) -> Figure:
    """Counts, coloured by row share (recall); rows are true classes, columns predictions."""
    matrix = np.asarray(matrix, dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.7 * len(classes)
    fig = _figure(size + 1.6, size)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} (n={int(matrix[i].sum())})" for i, c in enumerate(classes)])
    ax.set(xlabel="predicted class", ylabel="true class")
    # two short lines: one line with the source was wider than the figure and cut off in the PNG
    ax.set_title(f"{TASK_LABELS.get(task, task)}: confusion matrix\nn={int(matrix.sum())}, {source}", fontsize="medium")
    fig.colorbar(im, ax=ax, label="share of the true class")
    return fig


def risk_groups(risk: np.ndarray, scheme: str) -> tuple[np.ndarray, list[str]]:
    """Group index per patient by predicted risk: ``median`` (2 groups) or ``tertiles`` (3).

    Cut points are quantiles of the plotted patients' own predicted risk; ties at a cut point go
    to the lower group.
    """
    if scheme == "median":
        cuts = np.quantile(risk, [0.5])
        names = ["low risk (<= median)", "high risk (> median)"]
    elif scheme == "tertiles":
        cuts = np.quantile(risk, [1 / 3, 2 / 3])
        names = ["low risk (lowest third)", "intermediate risk", "high risk (highest third)"]
    else:
        raise ValueError(f"risk groups: unknown scheme {scheme!r} (use median or tertiles)")
    return np.searchsorted(cuts, risk, side="left"), names


def kaplan_meier(months: np.ndarray, censored: np.ndarray, risk: np.ndarray, scheme: str) -> tuple[Figure, dict]:
    """Kaplan-Meier curves of held-out patients split by predicted risk, with the log-rank test.

    Returns the figure and the test's summary (statistic, degrees of freedom, p-value, n per group).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    groups, names = risk_groups(risk, scheme)
    events = 1 - np.asarray(censored, int)
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    counts = {}
    for g, name in enumerate(names):
        sel = groups == g
        counts[name] = int(sel.sum())
        if not sel.any():
            continue
        kmf = KaplanMeierFitter(label=f"{name}: n={int(sel.sum())}, deaths={int(events[sel].sum())}")
        kmf.fit(months[sel], events[sel])
        kmf.plot_survival_function(ax=ax, ci_show=True, show_censors=True, censor_styles={"ms": 4, "marker": "|"})
    present = np.unique(groups)
    summary = {"scheme": scheme, "n": counts, "test": "log-rank"}
    if len(present) >= 2 and events.sum() > 0:
        test = multivariate_logrank_test(months, groups, events)
        summary.update(statistic=float(test.test_statistic), df=int(len(present) - 1), p_value=float(test.p_value))
        title_p = f"log-rank p = {test.p_value:.2g}"
    else:
        summary["p_value"] = None
        title_p = "log-rank test not computable (one group or no deaths)"
    ax.set(xlabel="follow-up time (months)", ylabel="survival probability", ylim=(0, 1.02))
    # the test's line on its own: "not computable (...)" on one line was wider than the figure
    ax.set_title(f"Kaplan-Meier by predicted risk ({scheme}), n={len(months)}\n{title_p}", fontsize="medium")
    ax.legend(fontsize=7, loc="lower left")
    return fig, summary


def forest_plot(rows: list[dict], title: str) -> Figure:
    """Per-site metric with its 95% CI: rows of {label, value, low, high, n, kind}.

    ``kind`` 'site' is drawn as a square, 'summary' (combined, pooled) as a diamond.
    """
    longest = max((len(f"{r['label']} (n={r['n']})") for r in rows), default=0)
    # long row labels push the axes (and the title centred over them) to the right: widen the figure
    fig = _figure(max(6.4, 4.4 + 0.075 * longest), 1.2 + 0.38 * max(len(rows), 1))
    ax = fig.subplots()
    for y, row in enumerate(reversed(rows)):
        v, lo, hi = row["value"], row.get("low"), row.get("high")
        if lo is not None and hi is not None:
            ax.hlines(y, lo, hi, color="black", lw=1.2)
        ax.plot([v], [y], marker="D" if row.get("kind") == "summary" else "s",
                color="tab:red" if row.get("kind") == "summary" else "tab:blue", ms=7)
    ax.set_yticks(range(len(rows)), [f"{r['label']} (n={r['n']})" for r in reversed(rows)])
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel=f"{title} (95% CI)", xlim=(0.0, 1.0), title=title)
    return fig


def privacy_epsilon(entries: list[dict], targets: dict[str, float]) -> Figure:
    """Cumulative epsilon per site (local DP) and of the aggregate (central DP) by round."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    series: dict[str, list[tuple[int, float]]] = {}
    for e in entries:
        if isinstance(e.get("epsilon"), (int, float)):
            series.setdefault(str(e.get("site")), []).append((int(e["round"]), float(e["epsilon"])))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=name)
    for target in sorted(set(targets.values())):
        ax.axhline(target, ls="--", lw=1.0, color="tab:red", label=f"budget (target epsilon) {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="cumulative epsilon (at the ledger's delta)", title="privacy spent per site",
           ylim=(0, None))
    ax.legend(fontsize=7, loc="lower right")
    return fig


def comparison(results: dict[str, dict], n: dict[str, int]) -> Figure:
    """Modes (centralized, federated, local-only ...) side by side per primary metric with CIs."""
    columns = metrics_of_tasks(results.values(), PRIMARY_METRICS)  # only the run's tasks get a panel
    fig = _figure(4.0 * len(columns), 1.4 + 0.42 * max(len(results), 1))
    axes = np.atleast_1d(fig.subplots(1, len(columns), sharey=True))
    modes = list(results)
    for ax, (task, metric) in zip(axes, columns):
        for y, mode in enumerate(reversed(modes)):
            m = metric_entry(results[mode], task, metric)
            if not has_value(m):
                continue
            if m.get("ci_low") is not None:
                ax.hlines(y, m["ci_low"], m["ci_high"], color="black", lw=1.2)
            colour = "tab:red" if mode == "federated" else "tab:green" if mode == "centralized" else "tab:blue"
            ax.plot([m["value"]], [y], "D", color=colour, ms=7)
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=f"{METRIC_LABELS[metric]} (95% CI)", title=TASK_LABELS[task], xlim=(0.0, 1.0))
    axes[0].set_yticks(range(len(modes)), [f"{m} (test n={n.get(m, '?')})" for m in reversed(modes)])
    return fig

"""Personalisation at a site: fine-tune the task heads of the final global model on the site's own
training split and compare global vs personalised on its own validation split.

Guarded (``federation.personalisation.guard``, the default): what to personalise is decided
without the validation split, which is the measurement. An inner split of the training patients
says, per task head, whether fine-tuning lowers that task's loss and after how many epochs; the
heads that pass are refitted on the whole training split for their counts, the others stay global.

Only metrics leave the site (the personalised weights stay there: a head fitted to a few dozen
patients says more about them than the federated average does). The k rule applies as in every
evaluation: a site whose training or validation split has fewer than k patients sends its count.
A site under local DP does not personalise (the fine-tuning is not DP-SGD) and says so.
Nothing here knows Flower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from umeml.config import ExperimentConfig
from umeml.data.dataset import make_loader
from umeml.data.splits import stratified_train_val
from umeml.federation.protocol import combine_site_metrics
from umeml.rundir import PRIMARY_METRICS, metric_entry
from umeml.train.dp import resolve_dp
from umeml.train.evaluate import evaluate_predictions
from umeml.train.experiment import Preprocessing, loss_settings
from umeml.train.loop import make_optimizer, predict, resolve_device, train_epoch
from umeml.train.losses import single_task_loss

HEAD_PREFIX = "heads."  # the task heads of every registered model (umeml.model.blocks.TaskHeads)
INNER_SPLIT_STREAM = 104729  # the inner split's seed offset: its shuffle differs from the train/validation split's


def personal_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a site fine-tunes: the task heads (every parameter of a model
    without separate heads, such as ``linear``)."""
    names = [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIX)]
    return names or [n for n, _ in model.named_parameters()]


@dataclass
class HeadTuning:
    """What one site's personalisation works with: the site, experiment, preprocessing, the
    global weights, the device, the loss and the head groups (:func:`head_groups`)."""

    site: object
    cfg: ExperimentConfig
    prep: Preprocessing
    state: dict
    device: torch.device
    loss: object
    groups: dict[str, list[str]]

    def fresh_model(self):
        """The global model on the device, as sent."""
        model = self.site.build_model(self.cfg, self.prep)
        model.load_state_dict(self.state)
        return model.to(self.device)


def head_groups(model: torch.nn.Module, tasks) -> dict[str, list[str]]:
    """The parameters each personalisation decision covers: per task its own head
    (``heads.heads.<task>.``), or one group ``heads`` of all :func:`personal_parameters` for a
    model whose heads are not separate per task."""
    personal = personal_parameters(model)
    groups = {t: [n for n in personal if n.startswith(f"{HEAD_PREFIX}heads.{t}.")] for t in tasks}
    if all(groups.values()) and sum(map(len, groups.values())) == len(personal):
        return groups
    return {"heads": personal}


@torch.no_grad()
def group_losses(model, loader, loss, device, groups: dict[str, list[str]]) -> dict[str, float]:
    """Mean per-patient loss of each group's tasks over ``loader`` (one task per group, or the sum
    of every task for the ``heads`` group), without the auxiliary term the heads do not change."""
    model.eval()
    tasks = {g: ([g] if g in loss.tasks else list(loss.tasks)) for g in groups}
    total, n = {g: 0.0 for g in groups}, 0
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        output = model(*batch.model_inputs())
        for g, ts in tasks.items():
            total[g] += sum(float(single_task_loss(output, batch, t, loss.weights.get(t),
                                                   loss.survival_alpha).sum()) for t in ts)
        n += len(batch)
    return {g: v / max(n, 1) for g, v in total.items()}


def choose_epochs(curves: dict[str, list[float]], metrics: dict[str, list] | None = None) -> dict[str, int]:
    """Per group, the epoch count (0 = the global head) with the lowest inner-validation loss in
    ``curves`` (``curves[g][e]``: the loss after ``e`` epochs); ties go to fewer epochs, so a head
    is personalised only when fine-tuning strictly lowered its loss. With ``metrics`` (the task's
    primary metric per epoch, higher is better; None where it cannot be computed) an epoch also
    needs a metric at least the global head's."""
    chosen = {}
    for g, c in curves.items():
        m = (metrics or {}).get(g)
        allowed = [e for e in range(len(c)) if e == 0 or m is None
                   or (m[e] is not None and m[0] is not None and m[e] >= m[0])]
        chosen[g] = int(min(allowed, key=lambda e: (c[e], e)))
    return chosen


def inner_split(site, cfg: ExperimentConfig, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The site's training patients split once more (``personalisation.inner_fraction`` to the
    inner validation, stratified by subtype), on a seed of its own so it does not repeat the
    train/validation split's shuffle."""
    fraction = cfg.federation.personalisation.inner_fraction
    return stratified_train_val(site.cohort, train_idx, fraction, cfg.seed + INNER_SPLIT_STREAM)


def fine_tune_heads(model, cfg: ExperimentConfig, site, idx, prep, loss, device, epochs: int,
                    after_epoch=None) -> None:
    """``epochs`` epochs of the heads only (the rest frozen) on patients ``idx`` (shuffle seeded
    by the experiment); ``after_epoch(e)`` is called after epoch ``e`` (1-based)."""
    tuned = set(personal_parameters(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in tuned)
    ds = site.dataset(cfg, idx, prep, train=True)  # the site's patients, its own standardisation
    loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed, cfg.train.num_workers)
    optimizer = make_optimizer(model, cfg.train)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        train_epoch(model, loader, optimizer, loss, device, None, cfg.train.grad_accum, cfg.train.amp)
        if after_epoch is not None:
            after_epoch(epoch + 1)


def inner_curves(tuning: HeadTuning, inner_train: np.ndarray, inner_val: np.ndarray,
                 epochs: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Each head group's inner-validation loss, and each task's primary metric (None where it
    cannot be computed), after 0, 1, ..., ``epochs`` epochs of fine-tuning on the inner-train
    patients (stays at the site)."""
    cfg = tuning.cfg
    torch.manual_seed(cfg.seed)  # dropout of the frozen trunk during fine-tuning
    model, groups = tuning.fresh_model(), tuning.groups
    loader = make_loader(tuning.site.dataset(cfg, inner_val, tuning.prep, train=False),
                         cfg.train.batch_size, False, 0)
    curves: dict[str, list[float]] = {g: [] for g in groups}
    # the metrics cost a second pass per epoch: only for the criterion that reads them
    with_metrics = cfg.federation.personalisation.criterion == "loss_and_metric"
    metrics: dict[str, list] = {g: [] for g in groups if with_metrics and g in dict(PRIMARY_METRICS)}

    def record(_epoch: int = 0) -> None:
        for g, v in group_losses(model, loader, tuning.loss, tuning.device, groups).items():
            curves[g].append(v)
        if metrics:
            tasks = evaluate_predictions(predict(model, loader, tuning.loss, tuning.device), cfg.tasks, 0, cfg.seed)
            for g in metrics:
                entry = metric_entry(tasks, g, dict(PRIMARY_METRICS)[g])
                metrics[g].append(None if entry is None else entry["value"])

    record()
    fine_tune_heads(model, cfg, tuning.site, inner_train, tuning.prep, tuning.loss, tuning.device, epochs, record)
    return curves, metrics


def guard_plan(tuning: HeadTuning, train_idx: np.ndarray, epochs: int) -> tuple[dict[str, int], dict]:
    """Epochs per head group, chosen on the inner split of the training patients (never the
    validation split); and the guard's report (inner sizes, why a head stayed global)."""
    cfg, site = tuning.cfg, tuning.site
    rules = cfg.federation.personalisation
    inner_train, inner_val = inner_split(site, cfg, train_idx)
    report = {"inner_train": int(len(inner_train)), "inner_val": int(len(inner_val)), "notes": []}
    if min(len(inner_train), len(inner_val)) < rules.min_inner_patients:
        report["notes"].append(f"inner split below min_inner_patients={rules.min_inner_patients}: every head global")
        return {g: 0 for g in tuning.groups}, report
    curves, metrics = inner_curves(tuning, inner_train, inner_val, epochs)
    plan = choose_epochs(curves, metrics or None)
    if "survival" in plan and int(site.cohort.times_events(inner_val)[1].sum()) < rules.min_inner_events:
        plan["survival"] = 0  # a loss over a handful of deaths decides nothing
        report["notes"].append(f"survival: fewer than min_inner_events={rules.min_inner_events} deaths in the "
                               "inner validation: global head")
    return plan, report


def refit(tuning: HeadTuning, train_idx: np.ndarray, plan: dict[str, int]):
    """The global model with each group's head fine-tuned on the whole training split for its
    planned epochs (0: left global). Heads are separate linear maps on a frozen trunk, so one run
    of the longest count with each group's weights taken at its own count fits them all."""
    torch.manual_seed(tuning.cfg.seed)  # dropout of the frozen trunk during fine-tuning
    model, groups = tuning.fresh_model(), tuning.groups
    params = dict(model.named_parameters())
    kept = {n: params[n].detach().clone() for g, names in groups.items() if not plan.get(g) for n in names}

    def snapshot(epoch: int) -> None:
        for g, names in groups.items():
            if plan.get(g) == epoch:
                kept.update({n: params[n].detach().clone() for n in names})

    fine_tune_heads(model, tuning.cfg, tuning.site, train_idx, tuning.prep, tuning.loss, tuning.device,
                    max(plan.values(), default=0), snapshot)
    with torch.no_grad():
        for n, value in kept.items():
            params[n].copy_(value)
    return model


def personalise(site, cfg: ExperimentConfig, prep: Preprocessing, state: dict, epochs: int) -> dict:
    """Personalise the heads of ``state`` at ``site`` (a :class:`~umeml.federation.site.SiteRuntime`)
    with up to ``epochs`` epochs (``federation.personalisation``: guarded by an inner split of the
    training patients, or every head for ``epochs``); returns the report that leaves the site:
    validation metrics of the global and of the personalised weights and the epochs per head,
    never weights."""
    train_idx, val_idx = site._split(cfg)
    base = {"site": site.site_id, "n": int(len(val_idx)), "n_train": int(len(train_idx))}
    if len(val_idx) < site.k_min or len(train_idx) < site.k_min:
        return {**base, "suppressed": True}
    dp, refusal = resolve_dp(site.dp, cfg.federation.local_dp)
    if dp is not None or refusal:
        # fine-tuning without DP-SGD would release metrics of a model fitted to the training
        # patients outside the site's privacy budget
        return {**base, "skipped": "local DP site: personalisation (non-private fine-tuning) not run"}
    t0 = time.perf_counter()
    device = resolve_device(site.device)
    model = site.build_model(cfg, prep)
    model.load_state_dict(state)
    tuning = HeadTuning(site, cfg, prep, state, device, loss_settings(cfg, prep).to(device),
                        head_groups(model, cfg.tasks))
    val_loader = make_loader(site.dataset(cfg, val_idx, prep, train=False), cfg.train.batch_size, False, 0)
    before = predict(model.to(device), val_loader, tuning.loss, device)
    guard = {}
    if cfg.federation.personalisation.guard:
        plan, guard = guard_plan(tuning, train_idx, epochs)
    else:
        plan = {g: int(epochs) for g in tuning.groups}
    after = predict(refit(tuning, train_idx, plan), val_loader, tuning.loss, device)
    return {**base, "epochs": int(epochs), "heads": plan, **({"guard": guard} if guard else {}),
            "global": {"loss": before.loss, "tasks": evaluate_predictions(before, cfg.tasks, 0, cfg.seed)},
            "personalised": {"loss": after.loss, "tasks": evaluate_predictions(after, cfg.tasks, 0, cfg.seed)},
            "seconds": round(time.perf_counter() - t0, 3)}


def summarise_personalisation(reports: dict[str, dict], epochs: int) -> dict:
    """final.json's ``personalisation`` record: every site's report, how many sites personalised
    each head, and global vs personalised validation metrics combined over the sites that reported
    both (n-weighted, c-index by comparable pairs), with the difference of each primary metric."""
    usable = {s: r for s, r in reports.items() if not r.get("suppressed") and "global" in r}
    heads: dict[str, int] = {}
    for r in usable.values():
        for group, n_epochs in (r.get("heads") or {}).items():
            heads[group] = heads.get(group, 0) + int(n_epochs > 0)
    out: dict = {"what": "task heads fine-tuned at each training site on its own training split (guarded: "
                         "kept per head only when an inner split of the training patients says it helps); "
                         "metrics on its own validation split (weights stay at the site)",
                 "epochs": int(epochs), "sites": reports, "n_sites": len(usable),
                 "n_validation": int(sum(int(r["n"]) for r in usable.values())),
                 "guarded": any("guard" in r for r in usable.values()), "sites_personalising": heads}
    if not usable:
        return out
    for part in ("global", "personalised"):
        out[f"{part}_combined"] = combine_site_metrics(
            {s: {"n": r["n"], "tasks": r[part]["tasks"]} for s, r in usable.items()})
    diff = {}
    for task, key in PRIMARY_METRICS:
        g = metric_entry(out["global_combined"], task, key)
        p = metric_entry(out["personalised_combined"], task, key)
        if g and p:
            diff[f"{task} {key}"] = p["value"] - g["value"]
    out["personalised_minus_global"] = diff
    return out

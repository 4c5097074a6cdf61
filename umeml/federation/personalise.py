"""Personalisation at a site: fine-tune the task heads of the final global model on the site's own
training split and compare global vs personalised on its own validation split.

Only metrics leave the site (the personalised weights stay there: a head fitted to a few dozen
patients says more about them than the federated average does). The k rule applies as in every
evaluation: a site whose training or validation split has fewer than k patients sends its count.
A site under local DP does not personalise (the fine-tuning is not DP-SGD) and says so.
Nothing here knows Flower.
"""

from __future__ import annotations

import time

import torch

from umeml.config import ExperimentConfig
from umeml.data.dataset import make_loader
from umeml.federation.protocol import combine_site_metrics
from umeml.rundir import PRIMARY_METRICS, metric_entry
from umeml.train.dp import resolve_dp
from umeml.train.evaluate import evaluate_predictions
from umeml.train.experiment import Preprocessing, loss_settings, make_dataset
from umeml.train.loop import make_optimizer, predict, resolve_device, train_epoch

HEAD_PREFIX = "heads."  # the task heads of every registered model (umeml.model.blocks.TaskHeads)


def personal_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a site fine-tunes: the task heads (every parameter of a model
    without separate heads, such as ``linear``)."""
    names = [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIX)]
    return names or [n for n, _ in model.named_parameters()]


def personalise(site, cfg: ExperimentConfig, prep: Preprocessing, state: dict, epochs: int) -> dict:
    """Fine-tune the heads of ``state`` for ``epochs`` epochs at ``site`` (a
    :class:`~umeml.federation.site.SiteRuntime`); returns the report that leaves the site:
    validation metrics of the global and of the personalised weights, never weights."""
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
    torch.manual_seed(cfg.seed)
    device = resolve_device(site.device)
    model = site.build_model(cfg, prep)
    model.load_state_dict(state)
    model.to(device)
    loss = loss_settings(cfg, prep).to(device)
    val_loader = make_loader(make_dataset(cfg, site.cohort, val_idx, prep, train=False), cfg.train.batch_size, False, 0)
    before = predict(model, val_loader, loss, device)
    tuned = set(personal_parameters(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in tuned)
    ds = make_dataset(cfg, site.cohort, train_idx, prep, train=True)
    loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed, cfg.train.num_workers)
    optimizer = make_optimizer(model, cfg.train)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        train_epoch(model, loader, optimizer, loss, device, None, cfg.train.grad_accum, cfg.train.amp)
    after = predict(model, val_loader, loss, device)
    return {**base, "epochs": int(epochs),
            "global": {"loss": before.loss, "tasks": evaluate_predictions(before, cfg.tasks, 0, cfg.seed)},
            "personalised": {"loss": after.loss, "tasks": evaluate_predictions(after, cfg.tasks, 0, cfg.seed)},
            "seconds": round(time.perf_counter() - t0, 3)}


def summarise_personalisation(reports: dict[str, dict], epochs: int) -> dict:
    """final.json's ``personalisation`` record: every site's report, and global vs personalised
    validation metrics combined over the sites that reported both (n-weighted, c-index by
    comparable pairs), with the difference of each primary metric."""
    usable = {s: r for s, r in reports.items() if not r.get("suppressed") and "global" in r}
    out: dict = {"what": "task heads fine-tuned at each training site on its own training split; "
                         "metrics on its own validation split (weights stay at the site)",
                 "epochs": int(epochs), "sites": reports, "n_sites": len(usable),
                 "n_validation": int(sum(int(r["n"]) for r in usable.values()))}
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

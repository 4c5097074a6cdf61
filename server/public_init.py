"""``umeml-server simulate`` with a DP fine-tuning config and no public checkpoint: train one
first, centrally, on the cohort's sites that take no part in the federation (the "public"
sites), and start the federation from it.

The public sites are other hospitals of the same synthetic world: their stain (feature offset
and scale) and label mix (subtype proportions) differ from the private sites', by the
generator's construction. (A cohort of another generator seed would be another world, other
morphotype centroids and gene effects, on which a public model has nothing to transfer.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.errors import ConfigError


def needs_public_checkpoint(cfg: ExperimentConfig) -> bool:
    """A named part trains (``train.trainable`` is not ``all``) but no checkpoint is given."""
    return cfg.federation.init_checkpoint is None and cfg.train.trainable != "all"


def public_training_config(cfg: ExperimentConfig, public: tuple[str, ...]) -> ExperimentConfig:
    """The central, non-DP training of the public checkpoint on the ``public`` sites: ``cfg``'s
    data, model and ``train`` sections with every parameter trainable (what bench_privacy trains too)."""
    return dataclasses.replace(cfg, name=f"{cfg.name}-public", train=dataclasses.replace(cfg.train, trainable="all"),
                               federation=dataclasses.replace(cfg.federation, train_sites=tuple(public)))


def with_public_checkpoint(cfg: ExperimentConfig, cohort: Cohort, held: tuple[str, ...], run_dir: Path,
                           printer: Callable[[str], None] = print) -> ExperimentConfig:
    """``cfg`` starting from a public checkpoint trained here when :func:`needs_public_checkpoint`."""
    if not needs_public_checkpoint(cfg):
        return cfg
    from umeml.data.splits import make_split
    from umeml.train.central import train_central

    training = set(cfg.federation.train_sites) or set(cohort.sites) - set(held)
    public = tuple(s for s in cohort.sites if s not in training and s not in set(held))
    if not public or not cfg.federation.train_sites:
        raise ConfigError(
            f"train.trainable is {cfg.train.trainable!r} and federation.init_checkpoint is not set: give a public "
            "checkpoint, or list federation.train_sites and leave cohort sites outside the federation to train "
            f"one on (sites: {', '.join(cohort.sites)}; e.g. umeml-server simulate --sites 7 for configs/demo_dp.yaml)")
    out = run_dir / "public"
    printer(f"no federation.init_checkpoint: training a public checkpoint first, centrally and without DP, on sites "
            f"{', '.join(public)} (not in the federation; their stain and label mix differ from the private sites') "
            f"-> {out}")
    central = public_training_config(cfg, public)
    split = make_split(cohort, tuple(held), len(held), cfg.split.val_fraction, cfg.seed, public)
    final = train_central(central, cohort, out, split=split, progress=False)
    printer(f"public checkpoint: best epoch {final['best_epoch']}, {final['n_train']} public training patients")
    path = out / "checkpoints" / "best.pt"
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, init_checkpoint=str(path)))


def format_privacy_totals(final: dict) -> str:
    """One line per site: its total epsilon and every release it made (empty without a ledger)."""
    totals = ((final.get("privacy") or {}).get("total")) or {}
    lines = []
    for site, t in sorted(totals.items()):
        parts = ", ".join(f"{r.get('kind')} {r.get('epsilon_alone', 0):.3g}" for r in t.get("releases", []))
        lines.append(f"  {site}: total epsilon {t['epsilon']:.3f} at delta {t.get('delta'):g} ({parts})")
    return ("total epsilon per site (every release composed):\n" + "\n".join(lines)) if lines else ""

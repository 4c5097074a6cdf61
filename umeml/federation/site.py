"""A hospital site's side of the protocol, free of Flower: answer queries, train, evaluate.

The ClientApp is a thin adapter that turns Flower messages into calls of :class:`SiteRuntime`.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from umeml import __version__
from umeml.config import DPConfig, ExperimentConfig, TrainConfig
from umeml.data.cohort import Cohort
from umeml.data.dataset import genomic_moments, make_loader
from umeml.data.labels import label_counts
from umeml.data.splits import stratified_train_val
from umeml.federation.label_skew import CalibratedLogits, site_offsets
from umeml.federation.privacy import (
    SiteLedger,
    calibrate_noise,
    composed_epsilon,
    compute_epsilon,
    discrete_laplace,
    max_steps_within,
    release_terms,
)
from umeml.federation.protocol import SURVIVAL_GRID_TEXT, survival_grid
from umeml.federation.scaffold import ControlExchange, ControlVariateStore, ScaffoldRound
from umeml.federation.schedule import OptimizerStore
from umeml.federation.stats_release import (
    ReleaseEpsilons,
    check_budget_room,
    check_cap,
    check_certifiable,
    private_standardiser,
    private_statistics,
    release_epsilons,
)
from umeml.model.parts import apply_trainable
from umeml.train.dp import resolve_dp, torch_seed, train_dp_steps, train_poisson_steps
from umeml.train.evaluate import evaluate_predictions
from umeml.train.experiment import Preprocessing, build_model, loss_settings, make_dataset
from umeml.train.loop import make_optimizer, predict, resolve_device, train_epoch

log = logging.getLogger("umeml.site")

HISTOGRAM_NOISE_STREAM = 7919  # separates the histogram's seeded noise from DP-SGD's (dp_seed + round)


def local_training_seed(seed: int, site_id: str, server_round: int) -> int:
    """Seed of a site's local training in one round (dropout, the no-DP twin's batches), fixed by
    experiment, site and round; 32 bits that depend on all three (:func:`~umeml.train.dp.torch_seed`:
    torch keeps only the low 32 bits of a seed, and ``seed << 32`` lost the experiment seed)."""
    return torch_seed((int(seed) << 32) ^ zlib.crc32(f"{site_id}:{server_round}".encode()))


def proximal_term(model, mu: float):
    """FedProx's mu/2 ||w - w_global||^2 as a function of the model, anchored at its current weights."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def term(m):
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    return term


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches in one epoch: 1/q rounded to the nearest integer (at least 1), so that an
    epoch samples about every training patient once. (Rounding down gave a site of 47 patients
    at batch 24 one step per epoch and one of 49 two.)"""
    return max(1, int(round(1.0 / sample_rate)))


def dp_schedule(cfg: ExperimentConfig, n_train: int, max_local_epochs: int) -> tuple[float, int, int]:
    """A DP-SGD site's sampling rate q, steps per epoch and planned steps per round.

    With ``federation.dp_recipe.enabled`` (the default): expected batch = ``batch_fraction`` x
    training patients, at least ``train.batch_size`` and at most all of them, and
    ``local_steps`` steps per round. Without it: q = batch_size / training patients and
    ``local_epochs`` epochs of :func:`steps_per_epoch` steps. The site's ``max_local_epochs``
    caps both.
    """
    recipe = cfg.federation.dp_recipe
    if recipe.enabled:
        batch = min(float(n_train), max(float(cfg.train.batch_size), recipe.batch_fraction * n_train))
        q = batch / n_train
        spe = steps_per_epoch(q)
        return q, spe, min(recipe.local_steps, max_local_epochs * spe)
    q = min(1.0, cfg.train.batch_size / n_train)
    spe = steps_per_epoch(q)
    return q, spe, min(cfg.federation.local_epochs, max_local_epochs) * spe


def dp_train_settings(cfg: ExperimentConfig) -> TrainConfig:
    """The optimiser settings of DP-SGD training: the recipe's plain SGD (no weight decay, no
    Adam state under noise) when ``federation.dp_recipe.enabled``, else ``train`` as configured."""
    recipe = cfg.federation.dp_recipe
    if not recipe.enabled:
        return cfg.train
    return replace(cfg.train, optimizer="sgd", lr=recipe.lr, momentum=recipe.momentum, weight_decay=0.0)


def noise_lr_factor(cfg: ExperimentConfig, dp: DPConfig, sample_rate: float, planned: int) -> float:
    """The DP recipe's learning-rate factor under noise (``dp_recipe.lr_rule``): sigma_ref / sigma,
    at most 1, where sigma_ref and sigma are the noise multipliers that the experiment's planned
    steps (rounds x ``planned`` at ``sample_rate``) alone need for ``lr_reference_epsilon`` and for
    the site's total (or the site's configured noise multiplier). Releases and earlier
    experiments are left out of both, so the factor is a function of the plan: exactly 1 at the
    reference epsilon, sigma_8 / sigma_1 = 0.18 at a total of 1 for the demo's plan."""
    recipe = cfg.federation.dp_recipe
    if not recipe.enabled or recipe.lr_rule == "fixed":
        return 1.0
    steps = cfg.federation.rounds * planned
    ref = calibrate_noise(recipe.lr_reference_epsilon, dp.delta, sample_rate, steps, dp.accountant)
    sigma = dp.noise_multiplier or calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, steps, dp.accountant)
    if ref is None or not sigma:  # nothing to scale by (a budget no noise reaches trains no step)
        return 1.0
    return min(1.0, float(ref) / float(sigma))


def dp_clip_groups(cfg: ExperimentConfig) -> str:
    """How DP-SGD clips per sample: the recipe's ``clip_groups`` when ``federation.dp_recipe.enabled``,
    else ``"joint"`` (one norm, as Opacus). Either way the sensitivity is ``max_grad_norm``."""
    recipe = cfg.federation.dp_recipe
    return recipe.clip_groups if recipe.enabled else "joint"


@dataclass
class SiteRuntime:
    """One site's data and the operations the coordinator may ask of it."""

    site_id: str
    cohort: Cohort
    indices: np.ndarray
    k_min: int = 10
    device: str = "auto"
    max_local_epochs: int = 1000
    dp: DPConfig | None = None  # the site's own local-DP terms (None: no local DP)
    state_dir: str | None = None  # where the site keeps its privacy ledger (the accountant's state)
    # simulations and tests: reproducible noise (DP-SGD, survival histogram); None (a real site) takes OS entropy
    dp_seed: int | None = None
    stats_cap: float | None = None  # site.yaml stats_privacy.max_epsilon: the most any release of statistics may cost
    site_file: str | None = None  # the site.yaml it came from (named in refusals)
    # experiment name -> (this site's patch-feature standardisers, their release's record), made once
    _standardisers: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        """Number of patients at the site."""
        return int(len(self.indices))

    def _split(self, cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
        return stratified_train_val(self.cohort, self.indices, cfg.split.val_fraction, cfg.seed)

    def stats_private(self, cfg: ExperimentConfig | None) -> bool:
        """Whether this site noises its statistics: the federation asks (``federation.stats_privacy``,
        on with local DP), or the site's own DP terms are on (it never sends them exactly then)."""
        asked = cfg is not None and cfg.federation.stats_private
        return bool(asked or (self.dp is not None and self.dp.enabled))

    def handshake(self, cfg: ExperimentConfig | None = None) -> dict:
        """Identity, version, schema and aggregate counts (label counts only at >= k patients;
        under stats privacy none, and modality counts only as presence flags: the preprocessing
        releases are the site's only, accounted, counts)."""
        c, idx = self.cohort, self.indices
        reply = {
            "site": self.site_id,
            "umeml_version": __version__,
            "n_patients": self.n,
            "feature_dim": int(c.feature_dim or 0),
            "encoder": c.encoder,
            "group_sizes": list(c.gene_groups.sizes),
            "subtypes": list(c.subtypes),
            "grades": list(c.grades),
            "with_pathology": int(c.has_path[idx].sum()) if self.n else 0,
            "with_genomics": int(c.has_genomics[idx].sum()) if self.n else 0,
        }
        if self.n < self.k_min or self.stats_private(cfg):  # modality counts become presence flags
            reply["with_pathology"] = min(reply["with_pathology"], 1)
            reply["with_genomics"] = min(reply["with_genomics"], 1)
        else:  # exact class counts only over >= k patients and outside statistics privacy
            reply["subtype_counts"] = label_counts([c.subtype_index(i) for i in idx], len(c.subtypes))
            reply["grade_counts"] = label_counts([c.grade_index(i) for i in idx], len(c.grades))
        return reply

    def preprocess(self, cfg: ExperimentConfig) -> dict:
        """Aggregates of the site's training patients for standardisation, bins and class weights."""
        train, _ = self._split(cfg)
        if len(train) < self.k_min:
            return {"site": self.site_id, "suppressed": True, "n": int(len(train))}
        c = self.cohort
        private = self.stats_private(cfg)
        self._check_stats_cap(cfg, private)
        feature_release = self._feature_release(cfg)  # released before DP-SGD is calibrated
        reply = {"site": self.site_id, "n": int(len(train))}
        # without the task no survival value is read; from a checkpoint its bins: no histogram leaves either
        if "survival" in cfg.tasks and not cfg.federation.preprocessing_from_checkpoint:
            reply["survival_hist"] = self._survival_histogram(cfg, train)
            # the epsilon it was noised at (a setting, resolved with the site's own total): privacy.json's record
            reply["survival_hist_epsilon"] = self._release_epsilons(cfg).survival_hist
        if private:
            reply = {**reply, **self._private_statistics(cfg, train)}
            reply["releases"] += [feature_release] if feature_release else []
            return reply
        reply.update(grade_counts=label_counts([c.grade_index(i) for i in train], len(c.grades)),
                     subtype_counts=label_counts([c.subtype_index(i) for i in train], len(c.subtypes)))
        # moments over fewer than k patients would be their values (one patient: sum = his profile)
        if (c.gene_groups.dim and int(c.has_genomics[train].sum()) >= self.k_min
                and not cfg.federation.genomics_from_checkpoint):
            count, total, total_sq = genomic_moments(c, train)
            reply.update(genomic_count=count.tolist(), genomic_sum=total.tolist(), genomic_sumsq=total_sq.tolist())
        return reply

    def _survival_histogram(self, cfg: ExperimentConfig, train: np.ndarray) -> list[int]:
        """The training patients' uncensored survival times counted on the public grid, as released."""
        times, events = self.cohort.times_events(train)
        grid = survival_grid()
        hist, _ = np.histogram(np.clip(times[events == 1], 0, grid[-1] - 1e-9), bins=grid)
        return self._released_histogram(cfg, hist.astype(np.int64))

    def _release_epsilons(self, cfg: ExperimentConfig) -> ReleaseEpsilons:
        """What each preprocessing release costs at this site: "auto" scales with the site's own
        local-DP total (its ``site.yaml`` may set a lower one than the federation's)."""
        settings, _ = resolve_dp(self.dp, cfg.federation.local_dp)
        return release_epsilons(cfg.federation, None if settings is None else settings.target_epsilon)

    def _check_stats_cap(self, cfg: ExperimentConfig, private: bool) -> None:
        """Refuse, before anything is released, what the site's ``stats_privacy.max_epsilon`` forbids."""
        eps = self._release_epsilons(cfg)
        requests = {}
        if "survival" in cfg.tasks and not cfg.federation.preprocessing_from_checkpoint:
            requests["the survival histogram (federation.survival_hist_epsilon)"] = eps.survival_hist
        if private:
            requests["the class counts (federation.stats_privacy.class_counts_epsilon)"] = eps.class_counts
            if self.cohort.gene_groups.dim and not cfg.federation.genomics_from_checkpoint:
                requests["the genomic moments (federation.stats_privacy.genomic_epsilon)"] = eps.genomic
            if self._standardises(cfg):
                requests["the patch-feature moments (federation.stats_privacy.feature_epsilon)"] = eps.features
        else:
            requests["the class counts and genomic moments (federation.stats_privacy is off)"] = None
        check_cap(requests, self.stats_cap, self.site_file, self.site_id)
        settings, _ = resolve_dp(self.dp, cfg.federation.local_dp)
        if settings is not None and private:  # the releases share the site's total with DP-SGD
            check_budget_room(requests, settings.target_epsilon, self.site_id)
        if private:  # a Gaussian release too small to certify fails here, not after the first release
            gaussian = {"class_counts_epsilon": eps.class_counts}
            if self.cohort.gene_groups.dim and not cfg.federation.genomics_from_checkpoint:
                gaussian["genomic_epsilon"] = eps.genomic
            if self._standardises(cfg):
                gaussian["feature_epsilon"] = eps.features
            delta = settings.delta if settings is not None else cfg.federation.local_dp.delta
            check_certifiable(gaussian, delta, self.site_id)

    def _private_statistics(self, cfg: ExperimentConfig, train: np.ndarray) -> dict:
        """Class counts and genomic moments as DP releases, recorded in the site's ledger when it has one."""
        settings, _ = resolve_dp(self.dp, cfg.federation.local_dp)  # the delta the site's DP-SGD will use
        delta = settings.delta if settings is not None else cfg.federation.local_dp.delta
        eps = self._release_epsilons(cfg)
        if self.state_dir is None:  # tests and ad-hoc simulations: noise, nowhere to record it
            return private_statistics(self.cohort, train, cfg, self.site_id, delta, eps, None, self.dp_seed)
        ledger = self.ledger()
        with ledger.locked():
            return private_statistics(self.cohort, train, cfg, self.site_id, delta, eps, ledger, self.dp_seed)

    def _standardises(self, cfg: ExperimentConfig) -> bool:
        """Whether this site standardises patch features (``data.site_standardise``; with pathology)."""
        from umeml.data.site_norm import applies

        return applies(cfg, self.cohort, self.indices)

    def standardisers(self, cfg: ExperimentConfig) -> dict | None:
        """``{site: SiteStandardiser}`` of this site's patients (None: ``data.site_standardise`` off),
        made once per experiment: under statistics privacy from a DP release of its patch-feature
        moments (recorded in its ledger, composed into its total), else (and at a held-out site of
        ``split.test_sites``, which never trains) exact. Never sent."""
        if not self._standardises(cfg):
            return None
        if cfg.name not in self._standardisers:
            std, record = self._make_standardiser(cfg)
            self._standardisers[cfg.name] = ({self.site_id: std}, record)
        return self._standardisers[cfg.name][0]

    def _feature_release(self, cfg: ExperimentConfig) -> dict | None:
        """The public record of this site's patch-feature release (None: none, or exact statistics)."""
        self.standardisers(cfg)
        return self._standardisers.get(cfg.name, (None, None))[1]

    def _make_standardiser(self, cfg: ExperimentConfig):
        """The site's standardiser and the public record of its release (None: exact, nothing released)."""
        from umeml.data.site_norm import exact_standardiser

        # a held-out site never trains: its model sees no patient of it, and its metrics are outside
        # every guarantee anyway (README, Privacy), so it standardises with its exact statistics
        if not self.stats_private(cfg) or self.site_id in cfg.split.test_sites:
            return exact_standardiser(self.cohort, self.indices), None
        settings, _ = resolve_dp(self.dp, cfg.federation.local_dp)
        delta = settings.delta if settings is not None else cfg.federation.local_dp.delta
        eps = self._release_epsilons(cfg).features
        args = (self.cohort, self.indices, cfg, self.site_id, delta, eps)
        if self.state_dir is None:  # tests and ad-hoc simulations: noise, nowhere to record it
            return private_standardiser(*args, None, self.dp_seed)
        ledger = self.ledger()
        with ledger.locked():
            return private_standardiser(*args, ledger, self.dp_seed)

    def dataset(self, cfg: ExperimentConfig, idx: np.ndarray, prep: Preprocessing, train: bool):
        """The site's patients ``idx`` as a dataset, standardised with the site's own standardiser."""
        return make_dataset(cfg, self.cohort, idx, prep, train=train, standardisers=self.standardisers(cfg))

    def _released_histogram(self, cfg: ExperimentConfig, exact: np.ndarray) -> list[int]:
        """The survival histogram as it leaves the site: epsilon-DP unless the experiment asks for
        exact counts (``federation.survival_hist_epsilon: null``, warned about loudly).

        Each patient is counted in exactly one cell (L1 sensitivity 1), so two-sided geometric
        noise of scale 1/epsilon on every cell gives epsilon-DP. Cells are not clipped at 0: the
        coordinator's quantiles stay unbiased that way. At a real site the noise comes from OS
        entropy, never from the experiment seed; simulations seed it (``dp_seed``) to be
        reproducible. With a state dir the release is recorded in the site's privacy ledger, and
        a repeated request for the same counts gets the same noisy answer.
        """
        eps = self._release_epsilons(cfg).survival_hist
        if eps is None:
            log.warning("site %s: sending an EXACT survival histogram (federation.survival_hist_epsilon is null): "
                        "it places each uncensored training patient's survival time within one grid cell (%s)",
                        self.site_id, SURVIVAL_GRID_TEXT)
            return exact.tolist()
        rng = None if self.dp_seed is None else np.random.default_rng([self.dp_seed, HISTOGRAM_NOISE_STREAM])
        if self.state_dir is None:  # tests and ad-hoc simulations: noise, nowhere to record it
            return (exact + discrete_laplace(exact.shape, eps, rng)).tolist()
        ledger = self.ledger()
        with ledger.locked():
            noisy, new = ledger.noisy_histogram(exact, eps, cfg.name, SURVIVAL_GRID_TEXT, rng)
        if new:
            log.info("site %s: released the survival histogram with epsilon %g (recorded in %s)",
                     self.site_id, eps, ledger.path)
        return noisy

    def build_model(self, cfg: ExperimentConfig, prep: Preprocessing):
        """The federation's architecture (identical at every site so weights average)."""
        if list(self.cohort.subtypes) != list(prep.subtypes) or list(self.cohort.grades) != list(prep.grades):
            raise ValueError(
                f"site {self.site_id}: class order differs from the coordinator's "
                f"(subtypes {list(self.cohort.subtypes)} vs {prep.subtypes}); labels would be misread"
            )
        return build_model(cfg, prep)

    def _trainable_model(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict):
        """The model with ``state`` loaded, only ``train.trainable`` left trainable (Opacus and
        the noise see only those under DP), on the site's device; returns (model, device)."""
        device = resolve_device(self.device)
        model = self.build_model(cfg, prep)
        model.load_state_dict(state)
        apply_trainable(model, cfg.train.trainable)
        return model.to(device), device

    def train(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, server_round: int,
              proximal_mu: float = 0.0, lr_scale: float = 1.0,
              control: ControlExchange | None = None) -> tuple[dict | None, dict]:
        """Local epochs from the global weights; returns new weights and aggregate metrics.

        With ``proximal_mu`` > 0 the FedProx term mu/2 ||w - w_global||^2 is added to each step.
        ``lr_scale`` is the round's learning-rate factor (the coordinator's round-level schedule);
        with ``federation.optimizer_state: site`` the optimizer's state carries over from the
        site's previous round (kept in its state dir). ``control`` (SCAFFOLD): the server control
        variate in; every step corrected by ``c - c_i``; ``control.delta`` out (non-DP path only).
        The weights are None when the site does not train (fewer than k training patients, local
        DP budget spent, or DP required but not configured here); ``metrics["skipped"]`` says why.
        """
        n_train = len(self._split(cfg)[0])
        if n_train < self.k_min:
            # weights and a mean loss over fewer than k patients would say too much about them
            reason = f"fewer than k={self.k_min} training patients ({n_train}); not training"
            log.warning("site %s, round %d: %s", self.site_id, server_round, reason)
            return None, {"skipped": reason}
        settings, refusal = resolve_dp(self.dp, cfg.federation.local_dp)
        if settings is not None and control is not None:  # c_i+ - c_i would leave outside DP-SGD's guarantee
            refusal = ("SCAFFOLD's control variate is an exact function of this site's gradients and cannot leave "
                       "a site under local DP; not training")
        if refusal:
            log.warning("site %s, round %d: %s", self.site_id, server_round, refusal)
            return None, {"skipped": refusal}
        # dropout draws from torch's global generator, whose state would otherwise depend on what
        # this process ran before (a simulation actor plays several sites in turn)
        torch.manual_seed(local_training_seed(cfg.seed, self.site_id, server_round))
        if settings is not None:
            self.standardisers(cfg)  # its release takes the ledger's lock itself: before the round holds it
            with self.ledger().locked():
                return self._train_dp(cfg, prep, state, server_round, proximal_mu, settings, lr_scale=lr_scale)
        if cfg.federation.dp_recipe.enabled and cfg.federation.dp_recipe.apply_without_dp:
            return self._train_recipe_without_dp(cfg, prep, state, server_round, proximal_mu, lr_scale=lr_scale)
        return self._train_plain(cfg, prep, state, server_round, proximal_mu, lr_scale, control)

    def _train_plain(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, server_round: int,
                     proximal_mu: float, lr_scale: float, control: ControlExchange | None) -> tuple[dict, dict]:
        """Local epochs without DP: FedProx's term, SCAFFOLD's correction or FedLC's calibrated
        logits as configured, the optimizer's state kept at the site when asked."""
        t0 = time.perf_counter()
        model, device = self._trainable_model(cfg, prep, state)
        train_idx, _ = self._split(cfg)
        ds = self.dataset(cfg, train_idx, prep, train=True)
        loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed + server_round, cfg.train.num_workers)
        optimizer = make_optimizer(model, cfg.train, lr_scale)
        store = (OptimizerStore(self.state_dir, self.site_id, cfg.name)
                 if cfg.federation.optimizer_state == "site" else None)
        if store is not None:
            store.load_into(optimizer, server_round)
        loss = loss_settings(cfg, prep).to(device)
        extra = proximal_term(model, proximal_mu) if proximal_mu > 0 else None
        scaffold = None if control is None else ScaffoldRound(
            ControlVariateStore(self.state_dir, self.site_id, cfg.name), control, model, server_round)
        extra = scaffold.term if scaffold is not None else extra

        tau = cfg.federation.logit_calibration_tau  # FedLC: the loss sees calibrated logits; model is what is sent
        trained = CalibratedLogits(model, site_offsets(self.cohort, train_idx, cfg.tasks, tau)) if tau > 0 else model

        stats, steps = {"loss": 0.0, "num_examples": 0, "steps": 0}, 0
        for epoch in range(min(cfg.federation.local_epochs, self.max_local_epochs)):
            ds.set_epoch(server_round * 1000 + epoch)
            stats = train_epoch(trained, loader, optimizer, loss, device, None, cfg.train.grad_accum, cfg.train.amp,
                                extra)
            steps += stats["steps"]
        if scaffold is not None:
            scaffold.finish(model, steps, optimizer.param_groups[0]["lr"], cfg.train.momentum)
        if store is not None:
            store.save(optimizer, server_round)
        new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return new_state, {"train_loss": stats["loss"], "num-examples": int(len(train_idx)), "steps": stats["steps"],
                           "seconds": round(time.perf_counter() - t0, 3)}

    def ledger(self) -> SiteLedger:
        """The site's privacy ledger in its state dir."""
        if self.state_dir is None:
            raise RuntimeError(f"site {self.site_id}: local DP needs a state dir for its privacy ledger "
                               "(state_dir in the site file; SimulatedSites.state_root in simulation)")
        return SiteLedger(Path(self.state_dir), self.site_id)

    def _dp_round_entry(self, cfg: ExperimentConfig, dp: DPConfig, ledger: SiteLedger, n_train: int,
                        server_round: int) -> tuple[dict, int, int, int]:
        """This round's ledger entry (sampling rate, noise multiplier, the steps the remaining
        budget allows, epsilon after them), the allowed and planned steps and the steps per epoch.

        Sampling rate, steps per epoch and planned steps: :func:`dp_schedule` (the DP recipe).
        The accountant composes every earlier entry of the ledger in the budget scope (all
        rounds, resumed runs, earlier experiments with scope ``site``). Without a configured
        noise multiplier one is calibrated so that the experiment's planned rounds spend the
        remaining budget, and then kept for the rest of the experiment.
        """
        q, spe, planned = dp_schedule(cfg, n_train, self.max_local_epochs)
        if dp.delta >= 1.0 / n_train:
            log.warning("site %s: dp.delta %g is not below 1/%d training patients; the guarantee is weak",
                        self.site_id, dp.delta, n_train)
        past = ledger.in_scope(cfg.name, dp.budget_scope)
        history = SiteLedger.history(past)
        # the calibration hook: one-off releases in scope (histogram, class counts, genomic moments)
        # are composed with DP-SGD, so target_epsilon bounds the site's total
        gaussian, pure = release_terms(ledger.releases_in_scope(cfg.name, dp.budget_scope))
        nm = dp.noise_multiplier
        if nm is None:  # calibrated once per experiment, then kept
            same = [e for e in past if e.get("experiment") == cfg.name and e.get("noise_multiplier")]
            nm = same[-1]["noise_multiplier"] if same else calibrate_noise(
                dp.target_epsilon, dp.delta, q, cfg.federation.rounds * planned, dp.accountant, history + gaussian, pure)
        if nm is None:
            allowed, total = 0, composed_epsilon(history + gaussian, pure, dp.delta, dp.accountant)
        else:
            allowed, total = max_steps_within(history + gaussian, nm, q, planned, dp.target_epsilon, dp.delta,
                                              dp.accountant, pure)
        eps = compute_epsilon(history + ([(nm, q, allowed)] if nm is not None else []), dp.delta, dp.accountant)
        entry = {"experiment": cfg.name, "round": int(server_round), "site": self.site_id, "kind": "local",
                 "status": "trained" if allowed == planned else ("partial" if allowed else "budget_spent"),
                 "sample_rate": q, "noise_multiplier": nm, "steps": int(allowed), "max_grad_norm": dp.max_grad_norm,
                 "epsilon": eps, "epsilon_total": total, "delta": dp.delta, "accountant": dp.accountant,
                 "target_epsilon": dp.target_epsilon, "budget_scope": dp.budget_scope, "clip_groups": dp_clip_groups(cfg),
                 "cumulative_steps": int(sum(steps for _, _, steps in history) + allowed)}
        return entry, allowed, planned, spe

    def _train_dp(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, server_round: int,
                  proximal_mu: float, dp: DPConfig, lr_scale: float = 1.0) -> tuple[dict | None, dict]:
        """DP-SGD for as many steps as the site's remaining budget allows (see
        :meth:`_dp_round_entry`), then the ledger entry, written before the update leaves. The
        round's ``lr_scale`` (the coordinator's schedule) scales the learning rate as without DP."""
        t0 = time.perf_counter()
        train_idx, _ = self._split(cfg)
        n_train = int(len(train_idx))
        if n_train == 0:
            return None, {"skipped": "no training patients at this site"}
        ledger = self.ledger()
        entry, allowed, planned, spe = self._dp_round_entry(cfg, dp, ledger, n_train, server_round)
        if allowed == 0:
            ledger.append(entry)
            reason = (f"privacy budget spent: total epsilon {entry['epsilon_total']:.3g} (DP-SGD and the one-off "
                      f"releases) of {dp.target_epsilon:g} "
                      f"(delta {dp.delta:g}); one more DP-SGD step would exceed it, so this site no longer trains "
                      "(it still evaluates)")
            log.warning("site %s, round %d: %s", self.site_id, server_round, reason)
            return None, {"skipped": reason, "privacy": entry}
        model, device = self._trainable_model(cfg, prep, state)
        ds = self.dataset(cfg, train_idx, prep, train=True)
        noise_factor = noise_lr_factor(cfg, dp, entry["sample_rate"], planned)
        if noise_factor < 1.0:
            log.info("site %s, round %d: learning rate x %.3g under noise multiplier %.3g (dp_recipe.lr_rule)",
                     self.site_id, server_round, noise_factor, entry["noise_multiplier"])
        optimizer = make_optimizer(model, dp_train_settings(cfg), lr_scale * noise_factor)
        stats = train_dp_steps(
            model, ds, optimizer, loss_settings(cfg, prep).to(device), device,
            sample_rate=entry["sample_rate"], noise_multiplier=entry["noise_multiplier"],
            max_grad_norm=dp.max_grad_norm, steps=allowed, steps_per_epoch=spe, proximal_mu=proximal_mu,
            seed=None if self.dp_seed is None else self.dp_seed + server_round,
            num_workers=cfg.train.num_workers, on_epoch=lambda e: ds.set_epoch(server_round * 1000 + e),
            clip_groups=entry["clip_groups"])
        ledger.append(entry)  # before the update leaves the site
        new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        metrics = {"train_loss": stats["loss"], "num-examples": n_train, "steps": stats["steps"],
                   "empty_batches": stats["empty_batches"], "seconds": round(time.perf_counter() - t0, 3),
                   "privacy": entry}
        if entry["status"] == "partial":
            metrics["note"] = f"privacy budget reached: trained {allowed} of {planned} steps; no further rounds"
        return new_state, metrics

    def _train_recipe_without_dp(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, server_round: int,
                                 proximal_mu: float, lr_scale: float = 1.0) -> tuple[dict | None, dict]:
        """The DP recipe's training without DP (``dp_recipe.apply_without_dp``): the schedule of
        :func:`dp_schedule` and the optimizer of :func:`dp_train_settings`, Poisson batches, no
        clipping, no noise, no ledger entry (nothing is privatised)."""
        t0 = time.perf_counter()
        train_idx, _ = self._split(cfg)
        q, spe, planned = dp_schedule(cfg, len(train_idx), self.max_local_epochs)
        model, device = self._trainable_model(cfg, prep, state)
        ds = self.dataset(cfg, train_idx, prep, train=True)
        stats = train_poisson_steps(
            model, ds, make_optimizer(model, dp_train_settings(cfg), lr_scale), loss_settings(cfg, prep).to(device),
            device,
            sample_rate=q, steps=planned, steps_per_epoch=spe, proximal_mu=proximal_mu,
            seed=local_training_seed(cfg.seed, self.site_id, server_round), num_workers=cfg.train.num_workers,
            on_epoch=lambda e: ds.set_epoch(server_round * 1000 + e))
        new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return new_state, {"train_loss": stats["loss"], "num-examples": int(len(train_idx)), "steps": stats["steps"],
                           "empty_batches": stats["empty_batches"], "seconds": round(time.perf_counter() - t0, 3)}

    def evaluate(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, part: str, n_boot: int) -> dict:
        """Metrics of the given weights on the site's ``part`` (all, or its local validation split)."""
        idx = self.indices if part == "all" else self._split(cfg)[1]
        if len(idx) < self.k_min:
            return {"site": self.site_id, "part": part, "n": int(len(idx)), "suppressed": True}
        t0 = time.perf_counter()
        device = resolve_device(self.device)
        model = self.build_model(cfg, prep)
        model.load_state_dict(state)
        model.to(device)
        loader = make_loader(self.dataset(cfg, idx, prep, train=False), cfg.train.batch_size, False, 0)
        preds = predict(model, loader, loss_settings(cfg, prep).to(device), device)
        metrics = evaluate_predictions(preds, cfg.tasks, n_boot=n_boot, seed=cfg.seed)
        return {"site": self.site_id, "part": part, "n": int(len(idx)), "loss": preds.loss, "tasks": metrics,
                "seconds": round(time.perf_counter() - t0, 3)}

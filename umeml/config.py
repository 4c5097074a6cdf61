"""Experiment configuration: YAML parsed once into typed, frozen dataclasses.

Every section is a frozen dataclass. Unknown keys, wrong types and out-of-range values raise
:class:`umeml.errors.ConfigError` naming the file and the dotted key path (``model.hidden_dim``).
The configuration never names code to import: models and strategies are chosen by registry name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from umeml.data.genomics import GENOMIC_SUFFIXES
from umeml.data.source import CohortSource, source_problem
from umeml.errors import ConfigError
from umeml.federation.accountants import available_accountants
from umeml.rundir import name_problem

DEFAULT_GRADE_MAP: dict[str, str] = {
    "ASTR": "II",
    "OAST": "II",
    "ODG": "II",
    "AASTR": "III",
    "AOAST": "III",
    "GBM": "IV",
}

TASKS = ("grade", "subtype", "survival")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass(frozen=True)
class DataConfig:
    """How a cohort is read: label maps, gene grouping, missing-value policy, bag sampling.

    Label maps are configuration, not glioma constants: ``subtype_column`` names the table
    column holding the subtype codes (``oncotree_code`` by default); ``subtypes`` lists the codes
    in class order, empty = the keys of ``grade_map``; ``grade_map`` maps codes to ``grades`` and
    is needed for every subtype only when the task ``grade`` runs.
    """

    grade_map: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_GRADE_MAP))
    grades: tuple[str, ...] = ("II", "III", "IV")
    subtypes: tuple[str, ...] = ()
    subtype_column: str = "oncotree_code"
    genomics_mode: Literal["signatures", "flat"] = "signatures"
    genomic_nan_policy: Literal["error", "impute_median"] = "error"
    max_patches: int | None = field(default=4096, metadata=_range(1))
    site_map: str | None = None
    min_patients_per_site: int = field(default=1, metadata=_range(1))
    # "features": each site standardises its patch features with its own centre and scale
    # (umeml/data/site_norm.py; under statistics privacy a DP release of the site's moments)
    site_standardise: Literal["none", "features"] = "none"
    # L2 bound of a patient's mean patch feature in that DP release (the encoder's units); needed
    # under statistics privacy with site_standardise: features (no data-independent default exists)
    feature_clip: float | None = field(default=None, metadata=_range(0.0, lo_open=True))


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level splits: which sites are held out for testing and the validation fraction."""

    test_sites: tuple[str, ...] = ()
    n_test_sites: int = field(default=1, metadata=_range(0))
    val_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))
    n_folds: int = field(default=5, metadata=_range(2))


@dataclass(frozen=True)
class SurvivalConfig:
    """Discrete-time survival: number of bins and the uncensored weight of the NLL loss."""

    n_bins: int = field(default=4, metadata=_range(2, 64))
    alpha: float = field(default=0.15, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class ModelConfig:
    """Model choice (registry name) and its hyper-parameters; see design section 5."""

    name: str = "umeml"
    hidden_dim: int = field(default=256, metadata=_range(1))
    n_prototypes: int = field(default=5, metadata=_range(1))
    n_registers: int = field(default=3, metadata=_range(0))
    n_heads: int = field(default=1, metadata=_range(1))
    dropout: float = field(default=0.25, metadata=_range(0.0, 0.95))
    drop_path: float = field(default=0.1, metadata=_range(0.0, 0.95))
    fusion: Literal["concat", "bilinear"] = "concat"
    modalities: tuple[Literal["pathology", "genomics"], ...] = ("pathology", "genomics")
    use_cross_attention: bool = True
    use_modularity: bool = True
    use_registers: bool = True
    # gamma and tau: the modularity term's weight and the assignment temperature. At tau 1 the
    # cosine/tau softmax is near uniform and gamma L_mod carries ~3e-5 of the task gradient;
    # tau 0.1, gamma 5 give it 12-14% (bench/bench_modularity_share.py, docs/benchmarks.md)
    gamma: float = field(default=5.0, metadata=_range(0.0))
    modularity_alpha: float = field(default=1.0, metadata=_range(0.0))
    modularity_beta: float = field(default=1.0, metadata=_range(0.0))
    tau: float = field(default=0.1, metadata=_range(0.0, lo_open=True))
    modularity_block: int = field(default=1024, metadata=_range(1))
    modularity_max_patches: int | None = field(default=None, metadata=_range(2))
    # spatial context from the bags' coords (umeml/model/spatial.py): "neighbours" adds the mean
    # of each patch's grid neighbours within spatial_radius cells to its embedding; "none" never
    # reads coords (the shipped default)
    spatial_context: Literal["none", "neighbours"] = "none"
    spatial_radius: int = field(default=1, metadata=_range(1, 4))
    # initial LayerNorm weight of the spatial term: 0 starts the model as plain UMEML (the term is
    # exactly zero) and lets training open the gate; 1 is the unit-scale term of the first figures
    spatial_gate_init: float = field(default=0.0, metadata=_range(0.0))
    # the survival head (umeml/model/blocks.py): "bins", a free linear map per time bin (the
    # published models'), or "proportional", one risk direction plus a baseline per bin
    survival_head: Literal["bins", "proportional"] = "bins"
    # the linear model's bottleneck: 0, heads on the inputs themselves; k > 0, a bias-free linear
    # map to k dimensions ("project") before the heads: trained on public data, it lets a site
    # fine-tune only the heads (train.trainable: heads), k x outputs weights under DP noise
    linear_rank: int = field(default=0, metadata=_range(0))


@dataclass(frozen=True)
class TrainConfig:
    """Local/centralized optimisation settings."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = field(default=2e-4, metadata=_range(0.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 0.999))  # sgd only
    weight_decay: float = field(default=1e-4, metadata=_range(0.0))
    epochs: int = field(default=10, metadata=_range(1))
    warmup_epochs: int = field(default=1, metadata=_range(0))
    batch_size: int = field(default=1, metadata=_range(1))
    grad_accum: int = field(default=1, metadata=_range(1))
    early_stopping_patience: int | None = field(default=None, metadata=_range(1))
    # model selection on a tiny validation split: its c-index counts only with at least this many
    # observed deaths (fewer: a handful of pairs decides; the validation loss is used instead)
    min_val_events: int = field(default=10, metadata=_range(0))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_workers: int = field(default=0, metadata=_range(0))
    bootstrap: int = field(default=1000, metadata=_range(0))
    # which parameters train: "all", "heads", "decoder" (decoder, norm, fusion and heads) or a
    # list of module names; frozen ones get no gradients, no DP noise and never leave a site
    trainable: str | tuple[str, ...] = "all"


@dataclass(frozen=True)
class DPConfig:
    """Local DP-SGD (Opacus) at a site; see design section 8 and ``umeml.train.dp``.

    In a site's ``site.yaml`` (``dp:``) these are the site's own terms. In an experiment
    (``federation.local_dp``) they are a request: ``enabled`` requires local DP from every
    training site and ``target_epsilon`` / ``delta`` can only lower a site's budget; in
    simulation the simulated sites adopt the request as their own settings.
    """

    enabled: bool = False
    target_epsilon: float = field(default=8.0, metadata=_range(0.0, lo_open=True))
    delta: float = field(default=1e-5, metadata=_range(0.0, 0.1, lo_open=True))
    noise_multiplier: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    accountant: str = "rdp"  # a name registered in umeml.federation.accountants
    budget_scope: Literal["site", "experiment"] = "site"


@dataclass(frozen=True)
class DPRecipeConfig:
    """How a site trains under local DP-SGD when ``enabled`` (the default): see README, Privacy.

    SGD with ``lr`` and ``momentum`` (no Adam state, which turns noise into full-size steps),
    Poisson batches of expected size ``batch_fraction`` x the site's training patients (at least
    ``train.batch_size``, at most all of them), ``local_steps`` DP-SGD steps per round instead of
    ``federation.local_epochs``; the noise is calibrated for rounds x local_steps steps. With
    local DP requested and no ``federation.strategy`` given, the strategy is ``fedavgm``.
    """

    enabled: bool = True
    # server momentum 0.9 multiplies the mean update by up to 10: 0.05 here is 0.5 effective
    lr: float = field(default=0.05, metadata=_range(0.0, lo_open=True))
    momentum: float = field(default=0.0, metadata=_range(0.0, 0.999))
    batch_fraction: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    local_steps: int = field(default=2, metadata=_range(1))
    # the non-private twin of a DP run: without local DP, sites still train with the recipe's
    # optimizer, Poisson batches and steps (no clipping, no noise), so that comparing the two
    # measures what clipping and noise alone cost (bench/bench_privacy.py)
    apply_without_dp: bool = False
    # per-sample clipping: "joint" (one norm over every trainable tensor, as Opacus) or "heads"
    # (each task head and the rest of the trainable model its own norm C / sqrt(K), K groups:
    # the same sensitivity max_grad_norm, the same noise and epsilon; README, Privacy)
    clip_groups: Literal["joint", "heads"] = "joint"
    # the learning rate under noise: "noise_scaled" multiplies lr by sigma_ref / sigma (at most 1),
    # the noise multipliers the planned steps need at lr_reference_epsilon and at the site's total
    # (its configured one, if any), so the noise each step adds stays what lr was tuned for at the
    # reference; at epsilon 1 the fixed lr of epsilon 8 diverged (docs/benchmarks.md). "fixed": lr as it is
    lr_rule: Literal["fixed", "noise_scaled"] = "noise_scaled"
    lr_reference_epsilon: float = field(default=8.0, metadata=_range(0.0, lo_open=True))


@dataclass(frozen=True)
class CentralDPConfig:
    """Central (site-level) DP through Flower's fixed-clipping strategy wrappers.

    Each site's update (its weights minus the global weights) is clipped to ``clipping_norm``
    (by the coordinator, or by the site with ``clipping: client``); Gaussian noise with
    standard deviation ``noise_multiplier * clipping_norm / sites`` is added to the uniform
    average. Flower's wrappers do not account; umeml records Opacus RDP epsilon per round.
    With ``target_epsilon`` the coordinator stops training before a round whose release would
    take epsilon beyond it (the final evaluation still runs).
    """

    enabled: bool = False
    noise_multiplier: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    clipping_norm: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    clipping: Literal["server", "client"] = "server"
    delta: float = field(default=1e-5, metadata=_range(0.0, 0.1, lo_open=True))
    target_epsilon: float | None = field(default=None, metadata=_range(0.0, lo_open=True))


@dataclass(frozen=True)
class StatsPrivacyConfig:
    """DP releases of the preprocessing statistics (``federation.stats_privacy``; README, Privacy).

    ``enabled`` null (the default) means: on exactly when ``federation.local_dp.enabled``. When
    on, every training site adds Gaussian noise before its statistics leave, calibrated so that
    each release alone costs at most its epsilon at the site's delta: the class counts (a
    subtype histogram, grade counts derived from it; L2 sensitivity 1) ``class_counts_epsilon``,
    the genomic count, sum and sum of squares of values clipped to [-``genomic_clip``,
    ``genomic_clip``] (raw units; features arriving as z-scores, CNV -2..2 or 0/1 mutations)
    ``genomic_epsilon``. (What a release costs in the site's composed total is far less than its
    epsilon alone; README, Privacy.) Off (DP off, the rule without local DP):
    a site with at least k patients sends them exactly, as before, unless its own ``site.yaml``
    enables DP (such a site always noises them). ``enabled: false`` together with local DP is
    refused. A site's ``site.yaml`` ``stats_privacy.max_epsilon`` caps what it accepts.
    ``genomic_source: checkpoint`` (with ``federation.init_checkpoint``) releases no genomic
    moments at all: the checkpoint's own standardisation is used; ``auto`` (the default) does so
    under statistics privacy whenever a checkpoint is given.
    """

    enabled: bool | None = None
    # "auto": a fifth of the site's local-DP total, at most 1.5 and 0.5 (noise sd 2.8 per cell at
    # 1.5); a number is used as it is (umeml.federation.stats_release.release_epsilons)
    class_counts_epsilon: float | Literal["auto"] = field(default="auto", metadata=_range(0.0, lo_open=True))
    genomic_epsilon: float | Literal["auto"] = field(default="auto", metadata=_range(0.0, lo_open=True))
    genomic_clip: float = field(default=3.0, metadata=_range(0.0, lo_open=True))
    # the site's patch-feature moments (data.site_standardise: features): used at the site only,
    # never sent; "auto": a fifth of the site's local-DP total, at most 2
    feature_epsilon: float | Literal["auto"] = field(default="auto", metadata=_range(0.0, lo_open=True))
    # "checkpoint": no site releases genomic moments; the federation standardises genomics as the
    # public checkpoint (federation.init_checkpoint) was trained (its meta), at no privacy cost;
    # "auto": "checkpoint" under statistics privacy when federation.init_checkpoint is set, else "sites"
    genomic_source: Literal["auto", "sites", "checkpoint"] = "auto"


@dataclass(frozen=True)
class SiteStatsPrivacyConfig:
    """A site's cap on the preprocessing releases (``site.yaml`` ``stats_privacy``).

    ``max_epsilon``: the most epsilon the site spends on any one release of statistics (class
    counts, genomic moments, survival histogram); a federation asking for more (or for an exact
    survival histogram) is refused with an error naming this file. Null: no cap.
    """

    max_epsilon: float | None = field(default=None, metadata=_range(0.0, lo_open=True))


# The federation strategies a config may name. The core never imports flwr, so the builders are
# registered in umeml.server.strategies, which refuses a name missing here; a test checks that
# every name here has a builder there.
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
              "scaffold")
# Central DP's noise is calibrated to a plain average of clipped updates: these strategies average
# (FedAvgM's server momentum only post-processes the noised average, which costs no privacy).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedavgm", "fedprox")
# The server learning rate when federation.server_lr is not set: FedAdam/FedYogi's eta, and
# FedAvgM's plain step (1.0 applies the momentum-smoothed average update in full).
DEFAULT_SERVER_LR = {"fedadam": 0.01, "fedyogi": 0.01, "fedavgm": 1.0}


@dataclass(frozen=True)
class PersonalisationConfig:
    """How a training site decides what to personalise (``federation.personalise_epochs`` > 0).

    With ``guard`` (the default) the decision never reads the site's validation split (that split
    is the measurement): the site splits its training patients once more (``inner_fraction`` to an
    inner validation, stratified by subtype, seeded), fine-tunes the heads on the inner-train part
    for up to ``personalise_epochs`` epochs, and keeps a task's personalised head only when some
    epoch lowered that task's inner-validation loss (the epoch with the lowest is the count); the
    kept heads are then refitted on the whole training split for their counts, the others stay
    global. An inner validation below ``min_inner_patients`` (or an inner train below it) keeps
    every head global; the survival head stays global with fewer than ``min_inner_events`` deaths
    in the inner validation. ``criterion: loss_and_metric`` also asks that the task's primary
    metric on the inner validation be no lower. ``guard: false``: every head fine-tuned for
    ``personalise_epochs``.
    """

    guard: bool = True
    inner_fraction: float = field(default=0.25, metadata=_range(0.0, 0.9, lo_open=True))
    min_inner_patients: int = field(default=10, metadata=_range(1))
    min_inner_events: int = field(default=5, metadata=_range(1))
    # "loss": a head is kept when fine-tuning lowers its task's inner-validation loss; "loss_and_metric":
    # and the task's primary metric (AUC, c-index) on the inner validation is no lower than the global head's
    criterion: Literal["loss", "loss_and_metric"] = "loss"


@dataclass(frozen=True)
class FederationConfig:
    """Federated rounds: strategy, which sites train, how often held-out sites evaluate."""

    rounds: int = field(default=3, metadata=_range(1))
    local_epochs: int = field(default=1, metadata=_range(1))
    strategy: str = "fedavg"  # one of STRATEGIES
    proximal_mu: float = field(default=0.01, metadata=_range(0.0))
    # FedLC logit calibration (umeml.federation.label_skew): sites train grade/subtype on logits
    # z_c - tau * n_c^(-1/4) with their own class counts (site-side only); 0: off
    logit_calibration_tau: float = field(default=0.0, metadata=_range(0.0))
    # None: the strategy's own default (DEFAULT_SERVER_LR); used by fedadam, fedyogi and fedavgm
    server_lr: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    # FedAvgM's server momentum (Hsu et al. 2019): the global step is a momentum-smoothed average
    # update, so site noise (label skew, DP noise) averages over rounds
    server_momentum: float = field(default=0.9, metadata=_range(0.0, 0.99))
    trimmed_beta: float = field(default=0.2, metadata=_range(0.0, 0.49))
    krum_byzantine: int = field(default=0, metadata=_range(0))
    train_sites: tuple[str, ...] = ()
    min_train_sites: int = field(default=1, metadata=_range(1))
    evaluate_every: int = field(default=1, metadata=_range(1))
    k_min_patients: int = field(default=10, metadata=_range(1))
    round_timeout_s: float = field(default=3600.0, metadata=_range(1.0))
    fp16_transfer: bool = False
    max_update_norm: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    local_dp: DPConfig = field(default_factory=DPConfig)
    dp_recipe: DPRecipeConfig = field(default_factory=DPRecipeConfig)
    # a umeml.model checkpoint of the same architecture that the global model starts from
    init_checkpoint: str | None = None
    # fnmatch patterns of weight names each site keeps for itself (FedBN-style): never sent,
    # the site's own copy carries over between rounds
    keep_local: tuple[str, ...] = ()
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    # FedAdam/FedYogi's adaptivity tau (Reddi et al. 2021 tune it over 1e-9..1e-1): None keeps Flower's 1e-3
    server_tau: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    # round-level learning-rate schedule of local training (umeml.federation.schedule): the
    # coordinator sends each round's factor in the round's config ("lr-scale"); sites train at
    # train.lr x factor. cosine: linear warm-up over warmup_rounds, then cosine decay over the rest
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_rounds: int = field(default=0, metadata=_range(0))
    # a site's optimizer state between rounds: "reset" (a fresh optimizer every round) or "site"
    # (momentum / Adam moments kept in the site's state dir, never sent)
    optimizer_state: Literal["reset", "site"] = "reset"
    # which global weights are the result: "best_validation" (the round whose weights scored best
    # on the training sites' validation splits, combined over sites; k rule per site) or "last"
    selection: Literal["best_validation", "last"] = "last"
    # personalisation wave after the last round: epochs of head fine-tuning at each training site
    # on its own training split, global vs personalised on its own validation (metrics only); 0: none
    personalise_epochs: int = field(default=0, metadata=_range(0))
    # what each site personalises, decided on an inner split of its training patients (PersonalisationConfig)
    personalisation: PersonalisationConfig = field(default_factory=PersonalisationConfig)
    # epsilon of the two-sided geometric noise each site adds to its preprocessing survival
    # histogram; None sends exact counts (a patient's survival time to within one grid cell);
    # "auto": 1.0, or a fifth of the site's local-DP total when that is smaller (release_epsilons)
    survival_hist_epsilon: float | Literal["auto"] | None = field(default="auto", metadata=_range(0.0, lo_open=True))
    # DP releases of the class counts and genomic moments (on with local DP unless set)
    stats_privacy: StatsPrivacyConfig = field(default_factory=StatsPrivacyConfig)
    # where the survival bin edges and the genomic standardisation come from: "checkpoint": those
    # the public checkpoint (init_checkpoint) was trained with (its meta), so a fine-tuned model
    # sees the inputs and targets it learnt on, and no site releases a survival histogram or
    # genomic moments (more of the epsilon left to DP-SGD); class weights stay the sites' (their
    # label mix); "sites": all from the training sites' releases; "auto": checkpoint when init_checkpoint is set
    preprocessing_source: Literal["auto", "sites", "checkpoint"] = "auto"

    @property
    def preprocessing_from_checkpoint(self) -> bool:
        """Whether the federation's preprocessing is the public checkpoint's (``preprocessing_source``
        checkpoint, or auto with ``init_checkpoint`` set): the sites are not asked for statistics."""
        src = self.preprocessing_source
        return src == "checkpoint" or (src == "auto" and self.init_checkpoint is not None)

    @property
    def genomics_from_checkpoint(self) -> bool:
        """Whether the genomic standardisation is the public checkpoint's (no site releases genomic
        moments): all preprocessing from the checkpoint (``preprocessing_source``), or
        ``stats_privacy.genomic_source`` checkpoint, or auto under statistics privacy with
        ``init_checkpoint`` set."""
        src = self.stats_privacy.genomic_source
        return (self.preprocessing_from_checkpoint or src == "checkpoint"
                or (src == "auto" and self.init_checkpoint is not None and self.stats_private))

    @property
    def stats_private(self) -> bool:
        """Whether the sites noise their class counts and genomic moments (``stats_privacy.enabled``,
        null: ``local_dp.enabled``)."""
        on = self.stats_privacy.enabled
        return self.local_dp.enabled if on is None else on


@dataclass(frozen=True)
class SimulationConfig:
    """Where ``umeml-server simulate`` runs its virtual sites (Flower's Ray backend).

    ``ray_address`` joins an existing Ray cluster (``HOST:6379``; ``auto`` finds the local
    one) instead of starting Ray on this machine; every virtual site reserves
    ``cpus_per_site`` CPUs and ``gpus_per_site`` GPUs of it (Flower's ``client_resources``; a
    fraction shares a GPU, 0.25 puts four sites on one).
    """

    ray_address: str | None = None
    cpus_per_site: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_site: float = field(default=0.0, metadata=_range(0.0))


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: what to learn, from which data, with which model and optimiser."""

    name: str = "experiment"
    seed: int = 0
    tasks: tuple[Literal["grade", "subtype", "survival"], ...] = TASKS
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


@dataclass(frozen=True)
class SiteConfig:
    """A hospital site's own settings (``site.yaml``): identity, data paths, local limits.

    The data paths are the file form of a :class:`~umeml.data.source.CohortSource`
    (:attr:`cohort_source`). Relative paths are resolved against the folder of the site file.
    The coordinator cannot raise the limits set here.
    """

    site_id: str = ""
    data_dir: str | None = None
    table: str | None = None
    signatures: str | None = None
    bags: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    k_min_patients: int = field(default=10, metadata=_range(1))
    max_local_epochs: int = field(default=10, metadata=_range(1))
    state_dir: str = "site-state"
    dp: DPConfig = field(default_factory=DPConfig)
    stats_privacy: SiteStatsPrivacyConfig = field(default_factory=SiteStatsPrivacyConfig)

    @property
    def cohort_source(self) -> CohortSource:
        """Where this site's cohort lives."""
        return CohortSource(self.data_dir, self.table, self.signatures, self.bags)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in its typed form."""

    def fail(rule: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {rule} (got {value!r})")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, source)
            except ConfigError as err:
                errors.append(str(err))
        raise fail("expected " + " or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise fail("must be one of " + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("expected a list")
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("expected a mapping")
        kt, vt = args
        return {
            _convert(k, kt, f"{path}.{k}", source): _convert(v, vt, f"{path}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("expected a string")
        return value
    raise fail(f"unsupported type {_type_name(tp)}")


def _check_range(value: Any, spec: tuple, path: str, source: str) -> None:
    if value is None or isinstance(value, str):  # a Literal alternative ("auto") has no range
        return
    lo, hi, lo_open = spec
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{source}: {path}: must be {'>' if lo_open else '>='} {lo} (got {value!r})")
    if hi is not None and value > hi:
        raise ConfigError(f"{source}: {path}: must be <= {hi} (got {value!r})")


def _build(cls: type, raw: Any, path: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {path or '<top level>'}: expected a mapping (got {raw!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = ", ".join(f"{path}.{k}" if path else str(k) for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {where}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key_path = f"{path}.{name}" if path else name
        converted = _convert(value, hints[name], key_path, source)
        if "range" in fields[name].metadata:
            _check_range(converted, fields[name].metadata["range"], key_path, source)
        kwargs[name] = converted
    obj = cls(**kwargs)
    _validate_semantics(obj, path, source)
    return obj


def _check_choice(value: str, names: tuple[str, ...], key: str, source: str) -> None:
    """A name that must be registered: the same message as a ``Literal`` field's."""
    if value not in names:
        raise ConfigError(f"{source}: {key}: must be one of {', '.join(repr(n) for n in names)} (got {value!r})")


def _validate_semantics(obj: Any, path: str, source: str) -> None:
    """Cross-field rules that a per-field type check cannot express."""
    prefix = f"{path}." if path else ""
    if isinstance(obj, ModelConfig):
        # imported here, not at the top: the registry imports this module; importing the package
        # registers every model
        from umeml.model import available_models

        if obj.name not in available_models():
            raise ConfigError(
                f"{source}: {prefix}name: unknown model {obj.name!r}; available: {', '.join(available_models())}"
            )
        if obj.hidden_dim % obj.n_heads:
            raise ConfigError(
                f"{source}: {prefix}hidden_dim: must be divisible by model.n_heads "
                f"({obj.hidden_dim} % {obj.n_heads} != 0)"
            )
        if not obj.modalities:
            raise ConfigError(f"{source}: {prefix}modalities: at least one modality is required")
        if len(set(obj.modalities)) != len(obj.modalities):
            raise ConfigError(f"{source}: {prefix}modalities: duplicate entries")
        _check_spatial_context(obj, prefix, source)
    _validate_site_and_federation(obj, prefix, source)
    if isinstance(obj, TrainConfig):
        _check_trainable(obj.trainable, f"{prefix}trainable", source)
    _validate_labels(obj, prefix, source)


def _check_spatial_context(model: "ModelConfig", prefix: str, source: str) -> None:
    """spatial_context reads the patches' coords: only a model that implements it (UMEML's
    pathology branch) may ask for it."""
    if not math.isfinite(model.spatial_gate_init):
        raise ConfigError(f"{source}: {prefix}spatial_gate_init: must be finite, got {model.spatial_gate_init!r}")
    if model.spatial_context == "none":
        return
    from umeml.model.registry import supports_spatial_context

    if not supports_spatial_context(model.name):
        raise ConfigError(f"{source}: {prefix}spatial_context: {model.spatial_context!r} is implemented for "
                          f"model.name umeml only, not {model.name!r} (use 'none')")
    if "pathology" not in model.modalities:
        raise ConfigError(f"{source}: {prefix}spatial_context: {model.spatial_context!r} needs the pathology "
                          "modality (it reads the patches' coords); use 'none' with modalities [genomics]")


def _validate_site_and_federation(obj: Any, prefix: str, source: str) -> None:
    """The site file's and the federation section's cross-field rules."""
    if isinstance(obj, SiteConfig):
        if not obj.site_id.strip():
            raise ConfigError(f"{source}: site_id: a non-empty site id is required")
        if name_problem(obj.site_id):  # it names the site's folders (sites/<site>/ in a simulation)
            raise ConfigError(f"{source}: site_id: {name_problem(obj.site_id)} (got {obj.site_id!r})")
        problem = source_problem(dataclasses.asdict(obj))
        if problem:
            raise ConfigError(f"{source}: {problem}")
    if isinstance(obj, DPConfig):
        _check_choice(obj.accountant, available_accountants(), f"{prefix}accountant", source)
    if isinstance(obj, FederationConfig):
        _check_choice(obj.strategy, STRATEGIES, f"{prefix}strategy", source)
    if isinstance(obj, FederationConfig) and obj.central_dp.enabled and obj.strategy not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"{source}: {prefix}central_dp: needs strategy {' or '.join(CENTRAL_DP_STRATEGIES)} (its noise is "
            f"calibrated to a plain average of clipped updates), not {obj.strategy!r}"
        )
    if isinstance(obj, FederationConfig) and obj.local_dp.enabled and obj.stats_privacy.enabled is False:
        raise ConfigError(
            f"{source}: {prefix}stats_privacy.enabled: false while {prefix}local_dp.enabled is true: the sites' "
            "class counts and genomic moments would leave exactly, outside every epsilon; remove the key (null "
            "follows local_dp)")
    if isinstance(obj, StatsPrivacyConfig):
        for key in ("class_counts_epsilon", "genomic_epsilon", "genomic_clip"):
            if getattr(obj, key) == float("inf"):
                raise ConfigError(f"{source}: {prefix}{key}: must be finite")
    if isinstance(obj, FederationConfig):
        _check_drift_control(obj, prefix, source)
    if isinstance(obj, FederationConfig) and obj.survival_hist_epsilon == float("inf"):
        raise ConfigError(f"{source}: {prefix}survival_hist_epsilon: must be finite (null sends exact counts)")
    if isinstance(obj, CentralDPConfig) and obj.target_epsilon is not None and not obj.enabled:
        raise ConfigError(
            f"{source}: {prefix}target_epsilon: set, but {prefix}enabled is false (no central DP would be "
            "applied and no budget enforced); enable central DP or remove the target"
        )


def _check_drift_control(fed: "FederationConfig", prefix: str, source: str) -> None:
    """Drift controls whose site-side state is an exact function of the site's data are refused
    with local DP (its guarantee covers only the noised weights, not extra exact state)."""
    if fed.local_dp.enabled and fed.strategy == "scaffold":
        raise ConfigError(
            f"{source}: {prefix}strategy: 'scaffold' cannot run with {prefix}local_dp.enabled: the site's control "
            "variate update (c_i+ - c_i) is an exact function of its patients' gradients and would leave the site "
            "outside the DP-SGD guarantee; choose another strategy or disable local DP")
    if fed.strategy == "scaffold" and fed.dp_recipe.enabled and fed.dp_recipe.apply_without_dp:
        raise ConfigError(
            f"{source}: {prefix}strategy: 'scaffold' corrects the plain local training only, not "
            f"{prefix}dp_recipe.apply_without_dp (the DP recipe's path); set one of them off")
    if fed.local_dp.enabled and fed.logit_calibration_tau > 0:
        raise ConfigError(
            f"{source}: {prefix}logit_calibration_tau: must be 0 with {prefix}local_dp.enabled (FedLC's offsets "
            "are the site's exact class counts, outside the DP-SGD guarantee); set it to 0 or disable local DP")
    if fed.dp_recipe.enabled and fed.dp_recipe.apply_without_dp and fed.logit_calibration_tau > 0:
        raise ConfigError(
            f"{source}: {prefix}logit_calibration_tau: applies to the plain local training only, not to "
            f"{prefix}dp_recipe.apply_without_dp (the DP recipe's path); set one of them off")


def _check_scaffold_training(cfg: "ExperimentConfig", source: str) -> None:
    """SCAFFOLD's option II assumes local SGD from a fresh optimizer over weights that are all sent."""
    if cfg.federation.strategy != "scaffold":
        return
    if cfg.train.optimizer != "sgd":
        raise ConfigError(f"{source}: train.optimizer: strategy 'scaffold' needs 'sgd' (its control variate "
                          f"estimates the gradient from the SGD steps taken; got {cfg.train.optimizer!r})")
    if cfg.federation.optimizer_state != "reset":
        raise ConfigError(f"{source}: federation.optimizer_state: strategy 'scaffold' needs 'reset' (the control "
                          "variate's step count assumes a momentum buffer that starts at zero every round)")
    if cfg.train.trainable != "all" or cfg.federation.keep_local:
        raise ConfigError(f"{source}: train.trainable / federation.keep_local: strategy 'scaffold' needs every "
                          "weight trained and sent (trainable 'all', keep_local empty)")


def _validate_labels(obj: Any, prefix: str, source: str) -> None:
    """Tasks and label maps: every subtype graded when grading, grades listed."""
    if isinstance(obj, ExperimentConfig):
        _check_scaffold_training(obj, source)
        if not obj.tasks or len(set(obj.tasks)) != len(obj.tasks):
            raise ConfigError(f"{source}: tasks: give one or more distinct tasks")
        ungraded = [c for c in obj.data.subtypes if c not in obj.data.grade_map]
        if "grade" in obj.tasks and ungraded:
            raise ConfigError(f"{source}: data.grade_map: the task grade needs a grade for every subtype in "
                              f"data.subtypes; missing for {ungraded}")
    if isinstance(obj, DataConfig):
        _check_subtype_column(obj.subtype_column, f"{prefix}subtype_column", source)
        if len(set(obj.subtypes)) != len(obj.subtypes) or any(not c.strip() for c in obj.subtypes):
            raise ConfigError(f"{source}: {prefix}subtypes: give distinct, non-empty codes (got {list(obj.subtypes)})")
        bad = sorted({g for g in obj.grade_map.values() if g not in obj.grades})
        if bad:
            raise ConfigError(
                f"{source}: {prefix}grade_map: grade(s) {bad} are not listed in {prefix}grades"
            )


# table columns with a meaning of their own (ids, site, survival, the loader's site column)
_NOT_A_SUBTYPE_COLUMN = ("case_id", "slide_id", "site", "survival_months", "censorship", "_site")


def _check_subtype_column(name: str, key: str, source: str) -> None:
    """``data.subtype_column``: a plain column name that no other role claims."""
    if not name.strip() or name != name.strip():
        raise ConfigError(f"{source}: {key}: give the table column holding the subtype codes, without "
                          f"surrounding spaces (got {name!r})")
    if name in _NOT_A_SUBTYPE_COLUMN:
        raise ConfigError(f"{source}: {key}: {name!r} is a column with its own meaning; name the column "
                          "holding the subtype codes (default oncotree_code)")
    if name.endswith(GENOMIC_SUFFIXES):
        raise ConfigError(f"{source}: {key}: {name!r} ends like a genomic column "
                          f"({', '.join(GENOMIC_SUFFIXES)}) and would be read as one")


TRAINABLE_PRESETS = ("all", "heads", "decoder")


def _check_trainable(value: str | tuple[str, ...], key: str, source: str) -> None:
    if isinstance(value, str):
        _check_choice(value, TRAINABLE_PRESETS, key, source)
    elif not value or any(not v.strip() for v in value):
        raise ConfigError(f"{source}: {key}: give a preset ({', '.join(TRAINABLE_PRESETS)}) or a non-empty "
                          f"list of module names (got {list(value)!r})")


def _dp_recipe_strategy(raw: dict) -> dict:
    """The DP recipe's one coordinator-side default: with ``federation.local_dp.enabled`` and the
    recipe on, a federation that names no strategy uses ``fedavgm`` (server momentum averages
    the sites' DP noise over rounds). Anything the config states explicitly is kept."""
    fed = raw.get("federation")
    if not isinstance(fed, dict) or "strategy" in fed:
        return raw
    local_dp, recipe = fed.get("local_dp"), fed.get("dp_recipe")
    if not (isinstance(local_dp, dict) and local_dp.get("enabled") is True):
        return raw
    if isinstance(recipe, dict) and recipe.get("enabled") is False:
        return raw
    return {**raw, "federation": {**fed, "strategy": "fedavgm"}}


def config_from_dict(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a mapping, checking every key."""
    if isinstance(raw, dict):
        raw = _dp_recipe_strategy(raw)
    return _build(ExperimentConfig, raw, "", source)


def load_config(path: str | Path, federated: bool = False) -> ExperimentConfig:
    """Read and check a YAML experiment file; ``federated``: also the limits of a federated run
    (:func:`check_federated`)."""
    path = Path(path)
    raw = _read_yaml(path, "config file", "an experiment names at least its tasks, model and train "
                                          "settings (see configs/demo.yaml); an empty file would run on every default")
    cfg = config_from_dict(raw, source=str(path))
    if federated:
        check_federated(cfg, str(path))
    return cfg


def check_federated(cfg: ExperimentConfig, source: str) -> None:
    """The limits a federated run adds to a config (ConfigError naming file and key).

    ``survival.n_bins``: the bin edges are quantiles of the sites' survival histograms, counted
    on a fixed public grid (``umeml.federation.protocol.survival_grid``); n bins need n - 1
    distinct interior edges among its cells, so at most one bin per cell.
    """
    from umeml.federation.protocol import SURVIVAL_GRID_TEXT, survival_grid  # torch: only for federated runs

    cells = len(survival_grid()) - 1
    if cfg.survival.n_bins > cells:
        raise ConfigError(
            f"{source}: survival.n_bins: must be <= {cells} in a federated run (got {cfg.survival.n_bins}): the "
            f"sites send survival histograms on {cells} fixed cells ({SURVIVAL_GRID_TEXT}) and each bin needs "
            "its own cell")


def _read_yaml(path: Path, what: str = "config file", empty_hint: str = "") -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror}") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:  # an empty file, or comments only
        raise ConfigError(f"{path}: the {what} is empty" + (f": {empty_hint}" if empty_hint else ""))
    return raw


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site YAML file; relative data paths become relative to its folder."""
    path = Path(path)
    raw = _read_yaml(path, "site file", "it needs at least site_id and data_dir (see configs/site.example.yaml)")
    site = _build(SiteConfig, raw, "", str(path))
    base = path.resolve().parent
    fixed = {}
    for name in ("data_dir", "table", "signatures", "bags", "state_dir"):
        value = getattr(site, name)
        if value is not None and not Path(value).is_absolute():
            fixed[name] = str(base / value)
    return dataclasses.replace(site, **fixed)


def config_to_dict(cfg: Any) -> Any:
    """Plain-Python form of a config (for the run directory's resolved config)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of a resolved config; loading it back gives an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

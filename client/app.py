"""The Flower ClientApp of a hospital site: a thin adapter from messages to :class:`SiteRuntime`.

Deployed, the SuperNode's ``--node-config "site-config='/path/site.yaml'"`` names the site file
(module-level ``app``). In simulation, :class:`SimulatedSites` maps each virtual node's
``partition-id`` to a site of one cohort (``build_client_app(SimulatedSites(...))``).
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import compute_clip_model_update

from umeml.client.keep_local import remember_local_copies, with_local_copies
from umeml.client.refusal import record_refusal
from umeml.config import DPConfig, ExperimentConfig, SiteConfig, config_from_dict, config_to_dict, load_site_config
from umeml.data.cohort import Cohort
from umeml.data.fingerprint import cohort_fingerprint
from umeml.data.source import CohortSource
from umeml.errors import UmemlError
from umeml.federation.partial import outgoing_update
from umeml.federation.personalise import personalise
from umeml.federation.privacy import KEY_CLIPPING_NORM
from umeml.federation.protocol import Preprocessing
from umeml.federation.redact import redact
from umeml.federation.scaffold import CONTROL_DELTA, SERVER_CONTROL, ControlExchange
from umeml.federation.schedule import LR_SCALE_KEY
from umeml.federation.site import SiteRuntime
from umeml.flower.packing import packing_mod
from umeml.flower.records import arrays_from_state, state_from_arrays
from umeml.flower.supernode_main import retry_internal_errors

retry_internal_errors()  # this process's HTTP calls to the SuperNode retry a 500 (supernode_main.py)

log = logging.getLogger("umeml.site")
_KNOWN_IDS: set[str] = set()  # case and slide ids of every cohort this process loaded (to redact errors)


class SiteError(UmemlError):
    """A site's handler failed; the message is the redacted text that the coordinator receives."""


def contained(handler):
    """Wrap a ClientApp handler so that its failure leaves the site without paths or ids.

    Flower sends an exception's text to the coordinator as the error reply's reason. The full
    text and traceback go to the site's own log; what is raised on (and sent) is
    ``SiteError("<type>: <redacted text>")``.
    """
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # noqa: BLE001 - every failure must be redacted before it leaves
            log.error("%s failed (the coordinator receives a redacted message): %s: %s",
                      msg.metadata.message_type, type(err).__name__, err, exc_info=True)
            raise SiteError(redact(f"{type(err).__name__}: {err}", _KNOWN_IDS)) from None

    return run


_COHORTS: dict[tuple, tuple[str, Cohort]] = {}  # (source, data, tasks) -> (fingerprint, cohort)
_MAX_COHORTS = 4


def _cohort(source: CohortSource, data_json: str, tasks: tuple[str, ...] | None = None) -> Cohort:
    """The cohort ``source`` read with the experiment's data section and tasks (``umeml-client check
    --config`` reads it the same way), loaded once per process: a site answers many messages,
    and a resident site process many runs, from the same data. Before every use the files'
    fingerprint is compared with the one taken at loading; a changed file means a reload, so
    no message runs against stale data."""
    key = (source, data_json, tasks)
    site_map = json.loads(data_json).get("site_map")
    fingerprint = cohort_fingerprint(source, [site_map])
    cached = _COHORTS.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    if cached is not None:
        log.warning("site data changed on disk since it was loaded; reading it again")
    data_cfg = config_from_dict({"data": json.loads(data_json)}, "coordinator config").data
    cohort = source.load(data_cfg, tasks)
    _KNOWN_IDS.update(p.case_id for p in cohort.patients)
    _KNOWN_IDS.update(s for p in cohort.patients for s in p.slide_ids)
    _COHORTS.pop(key, None)
    _COHORTS[key] = (fingerprint, cohort)
    while len(_COHORTS) > _MAX_COHORTS:  # oldest first
        _COHORTS.pop(next(iter(_COHORTS)))
    return cohort


def experiment_from(msg: Message) -> ExperimentConfig:
    """The coordinator's experiment config carried by a message (checked like a local file)."""
    return config_from_dict(json.loads(str(msg.content["config"]["experiment"])), "coordinator config")


def _data_json(cfg: ExperimentConfig) -> str:
    # key order matters: the grade map's order defines the subtype class indices
    return json.dumps(config_to_dict(cfg.data))


def deployed_site(context: Context, cfg: ExperimentConfig) -> SiteRuntime:
    """This node's site, from the site file named by the SuperNode's ``site-config`` node config."""
    node = context.node_config
    if "site-config" not in node:
        raise RuntimeError("this SuperNode has no 'site-config' in --node-config; start it with umeml-client start")
    site: SiteConfig = load_site_config(str(node["site-config"]))
    cohort = _cohort(site.cohort_source, _data_json(cfg), cfg.tasks)
    return SiteRuntime(site.site_id, cohort, np.arange(len(cohort)),
                       k_min=max(site.k_min_patients, cfg.federation.k_min_patients), device=site.device,
                       max_local_epochs=site.max_local_epochs, dp=site.dp, state_dir=site.state_dir,
                       stats_cap=site.stats_privacy.max_epsilon, site_file=str(node["site-config"]))


@dataclass(frozen=True)
class SimulatedSites:
    """Simulation: virtual node ``partition-id`` plays ``sites[partition-id]`` of the cohort ``source``.

    Simulated sites take the experiment's ``federation.local_dp`` as their own DP terms (unless
    ``dp`` overrides it) and keep their privacy ledgers in ``state_root/<site>`` (the run
    dir's ``sites/`` folder in ``umeml-server simulate``). With ``seeded_noise`` (the default)
    every noise draw (DP-SGD, the survival histogram) is seeded from the experiment seed and the
    site, so a simulation is reproducible; real sites draw their noise from OS entropy.
    """

    sites: tuple[str, ...]
    source: CohortSource
    device: str = "cpu"
    state_root: str | None = None
    dp: DPConfig | None = None
    seeded_noise: bool = True

    def __call__(self, context: Context, cfg: ExperimentConfig) -> SiteRuntime:
        site_id = self.sites[int(context.node_config["partition-id"])]
        cohort = _cohort(self.source, _data_json(cfg), cfg.tasks)
        return SiteRuntime(site_id, cohort, cohort.site_indices(site_id), k_min=cfg.federation.k_min_patients,
                           device=self.device, dp=self.dp if self.dp is not None else cfg.federation.local_dp,
                           state_dir=str(Path(self.state_root) / site_id) if self.state_root else None,
                           dp_seed=simulation_noise_seed(cfg.seed, site_id) if self.seeded_noise else None)


def simulation_noise_seed(seed: int, site_id: str) -> int:
    """A simulated site's noise seed: distinct per site (independent noise at each site), fixed
    by the experiment seed (reproducible runs)."""
    return (int(seed) << 32) | zlib.crc32(site_id.encode())


def _json_reply(msg: Message, payload: dict) -> Message:
    return Message(RecordDict({"report": ConfigRecord({"json": json.dumps(payload)})}), reply_to=msg)


def clip_update(new: dict, old: dict, clipping_norm: float) -> dict:
    """``old + clip(new - old)``: a site's update scaled to L2 norm <= ``clipping_norm`` (over all
    floating tensors), as Flower's ``fixedclipping_mod`` does for central DP with client-side clipping."""
    keys = [k for k, v in new.items() if torch.is_floating_point(v)]
    after = [new[k].detach().cpu().double().numpy().copy() for k in keys]
    before = [old[k].detach().cpu().double().numpy() for k in keys]
    compute_clip_model_update(after, before, clipping_norm)
    out = dict(new)
    for k, a in zip(keys, after):
        out[k] = torch.from_numpy(a).to(new[k].dtype)
    return out


def _add_refusal_handler(app: ClientApp, resolve: Callable[[Context, ExperimentConfig], SiteRuntime]) -> None:
    @app.query("refused")
    @contained
    def refused(msg: Message, context: Context) -> Message:
        """The coordinator refused this node: log why and tell ``umeml-client start`` (refusal.py)."""
        site = resolve(context, experiment_from(msg))
        return _json_reply(msg, record_refusal(site.state_dir, site.site_id, str(msg.content["config"]["reason"])))


def validation_first(site: SiteRuntime, cfg: ExperimentConfig, prep: Preprocessing, received: dict,
                     conf) -> dict | None:
    """One wave per round: when a train message asks for it (``validate-part``), the site scores
    the weights it received (the global weights of round ``validate-round``) before training;
    the report travels in the training reply. None when not asked."""
    if "validate-part" not in conf:
        return None
    report = site.evaluate(cfg, prep, received, str(conf["validate-part"]), int(conf.get("validate-n-boot", 0)))
    return {**report, "weights_round": int(conf["validate-round"])}


def received_control(msg: Message, cfg: ExperimentConfig) -> ControlExchange | None:
    """SCAFFOLD's server control variate from a train message (None for other strategies); a
    ValueError when the strategy is scaffold and the message carries none."""
    if cfg.federation.strategy != "scaffold":
        return None
    if SERVER_CONTROL not in msg.content.array_records:
        raise ValueError(f"strategy scaffold: the train message carries no server control variate ({SERVER_CONTROL})")
    return ControlExchange(state_from_arrays(msg.content.array_records[SERVER_CONTROL]))


def train_reply(msg: Message, context: Context, cfg: ExperimentConfig, conf, prep: Preprocessing,
                site: SiteRuntime) -> Message:
    """A train message's reply: the validation of the received weights (with the site's own
    ``keep_local`` copies; one wave per round), then local epochs from them; the update (clipped
    under central DP with client-side clipping; only the trainable, shared weights) and the
    site's report."""
    mu = float(conf.get("proximal-mu", 0.0))
    received = with_local_copies(context, state_from_arrays(msg.content["arrays"]), cfg, prep)
    validation = validation_first(site, cfg, prep, received, conf)
    control = received_control(msg, cfg)
    state, metrics = site.train(cfg, prep, received, int(conf["server-round"]), mu, float(conf.get(LR_SCALE_KEY, 1.0)),
                                control)
    if validation is not None:
        metrics = {**metrics, "validation": validation}
    if state is None:  # the site did not train (privacy budget spent, DP required but not set up)
        return _json_reply(msg, {"site": site.site_id, **metrics})
    if KEY_CLIPPING_NORM in conf:  # central DP with client-side clipping (Flower's wrapper sent the norm)
        state = clip_update(state, received, float(conf[KEY_CLIPPING_NORM]))
    remember_local_copies(context, state, cfg, prep)
    state = outgoing_update(state, cfg, prep)  # only the trainable, shared weights leave the site
    reply = RecordDict({
        "arrays": arrays_from_state(state, fp16=cfg.federation.fp16_transfer),
        "metrics": MetricRecord({"num-examples": metrics["num-examples"], "train_loss": float(metrics["train_loss"])}),
        "report": ConfigRecord({"json": json.dumps({"site": site.site_id, **metrics})}),
    })
    if control is not None:  # SCAFFOLD: c_i+ - c_i travels with the update
        reply[CONTROL_DELTA] = arrays_from_state(control.delta)
    return Message(reply, reply_to=msg)


def build_client_app(resolve: Callable[[Context, ExperimentConfig], SiteRuntime]) -> ClientApp:
    """A ClientApp whose handlers find their site with ``resolve`` (deployed or simulated); weights
    that come packed are unpacked before the handlers run, and the reply's packed
    (:func:`umeml.flower.packing.packing_mod`)."""
    app = ClientApp(mods=[packing_mod])

    def round_request(msg: Message, context: Context):
        """What a train or evaluate message carries: experiment, its config record, the
        federation's preprocessing, and this node's site."""
        cfg = experiment_from(msg)
        conf = msg.content["config"]
        return cfg, conf, Preprocessing.from_json(str(conf["preprocessing"])), resolve(context, cfg)

    @app.query("handshake")
    @contained
    def handshake(msg: Message, context: Context) -> Message:
        """Site id, umeml version, data schema and aggregate counts."""
        cfg = experiment_from(msg)
        return _json_reply(msg, resolve(context, cfg).handshake(cfg))

    _add_refusal_handler(app, resolve)

    @app.query("preprocess")
    @contained
    def preprocess(msg: Message, context: Context) -> Message:
        """Aggregates for genomic standardisation, survival bins and class weights."""
        cfg = experiment_from(msg)
        return _json_reply(msg, resolve(context, cfg).preprocess(cfg))

    @app.train()
    @contained
    def train(msg: Message, context: Context) -> Message:
        """Local epochs from the global weights."""
        return train_reply(msg, context, *round_request(msg, context))

    @app.evaluate()
    @contained
    def evaluate(msg: Message, context: Context) -> Message:
        """Metrics of the global weights on the site's held-out patients or local validation split."""
        cfg, conf, prep, site = round_request(msg, context)
        weights = with_local_copies(context, state_from_arrays(msg.content["arrays"]), cfg, prep)
        report = site.evaluate(cfg, prep, weights, str(conf["part"]), int(conf["n-boot"]))
        return Message(RecordDict({
            "metrics": MetricRecord({"num-examples": int(report["n"])}),
            "report": ConfigRecord({"json": json.dumps(report)}),
        }), reply_to=msg)

    _add_personalise(app, resolve)
    return app


def _add_personalise(app: ClientApp, resolve: Callable[[Context, ExperimentConfig], SiteRuntime]) -> None:
    """The personalisation wave's handler (``query.personalise``): fine-tune the heads on the
    site's training split, reply global vs personalised validation metrics; the personalised
    weights stay at the site."""

    @app.query("personalise")
    @contained
    def personalise_heads(msg: Message, context: Context) -> Message:
        cfg = experiment_from(msg)
        conf = msg.content["config"]
        prep = Preprocessing.from_json(str(conf["preprocessing"]))
        state = state_from_arrays(msg.content["arrays"])
        return _json_reply(msg, personalise(resolve(context, cfg), cfg, prep, state, int(conf["epochs"])))


app = build_client_app(deployed_site)

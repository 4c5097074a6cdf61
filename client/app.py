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
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import compute_clip_model_update

from umeml.client.keep_local import remember_local_copies, with_local_copies
from umeml.config import DPConfig, ExperimentConfig, SiteConfig, config_from_dict, config_to_dict, load_site_config
from umeml.data.cohort import Cohort
from umeml.data.source import CohortSource
from umeml.errors import UmemlError
from umeml.federation.partial import outgoing_update
from umeml.federation.privacy import KEY_CLIPPING_NORM
from umeml.federation.protocol import Preprocessing
from umeml.federation.redact import redact
from umeml.federation.site import SiteRuntime
from umeml.flower.records import arrays_from_state, state_from_arrays

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


@lru_cache(maxsize=4)
def _cohort(source: CohortSource, data_json: str) -> Cohort:
    """Load a cohort once per process (a site answers many messages from the same data), with the
    experiment's data section (``umeml-client check --config`` reads it the same way)."""
    data_cfg = config_from_dict({"data": json.loads(data_json)}, "coordinator config").data
    cohort = source.load(data_cfg)
    _KNOWN_IDS.update(p.case_id for p in cohort.patients)
    _KNOWN_IDS.update(s for p in cohort.patients for s in p.slide_ids)
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
    cohort = _cohort(site.cohort_source, _data_json(cfg))
    return SiteRuntime(site.site_id, cohort, np.arange(len(cohort)),
                       k_min=max(site.k_min_patients, cfg.federation.k_min_patients), device=site.device,
                       max_local_epochs=site.max_local_epochs, dp=site.dp, state_dir=site.state_dir)


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
        cohort = _cohort(self.source, _data_json(cfg))
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


def build_client_app(resolve: Callable[[Context, ExperimentConfig], SiteRuntime]) -> ClientApp:
    """A ClientApp whose handlers find their site with ``resolve`` (deployed or simulated)."""
    app = ClientApp()

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
        return _json_reply(msg, resolve(context, cfg).handshake())

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
        cfg, conf, prep, site = round_request(msg, context)
        mu = float(conf.get("proximal-mu", 0.0))
        received = with_local_copies(context, state_from_arrays(msg.content["arrays"]), cfg, prep)
        state, metrics = site.train(cfg, prep, received, int(conf["server-round"]), mu)
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
        return Message(reply, reply_to=msg)

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

    return app


app = build_client_app(deployed_site)

"""An in-process Grid for coordinator tests: delivers messages straight to ClientApp handlers.

It runs the real ServerApp-side code (Coordinator, Flower strategies) and the real ClientApp
handlers, without Ray or network processes, so protocol logic is tested in seconds.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common import Metadata
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity

from umeml.config import ExperimentConfig, config_from_dict


class LocalGrid:
    """Nodes 101, 102, ... each playing ``sites[i]`` through ``client_app``.

    ``drop`` maps a node id to a predicate ``(message_type, round) -> bool``: when it returns
    True the node does not answer (a site that died mid-round). ``tamper`` maps a node id to a
    function applied to its reply (a misbehaving site). ``names`` maps a node id to the name its
    key was registered under, as the SuperLink's node records report it with site authentication.
    """

    def __init__(self, client_app, n_nodes: int, drop=None, tamper=None, names=None):
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.app = client_app
        self.node_ids = [101 + i for i in range(n_nodes)]
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": n_nodes},
                       state=RecordDict(), run_config={})
            for i, n in enumerate(self.node_ids)
        }
        self.drop = drop or {}
        self.tamper = tamper or {}
        self.names = names or {}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        """Connected node ids."""
        return list(self.node_ids)

    def get_nodes(self):
        """Node records as Flower's Grid reports them (with the registered name, where one is set)."""
        return [NodeInfo(node_id=n, name=self.names[n]) if n in self.names else NodeInfo(node_id=n)
                for n in self.node_ids]

    def add_node(self, partition: int) -> int:
        """A node that joins mid-run playing ``sites[partition]``; returns its id."""
        node = max(self.node_ids) + 1
        self.node_ids.append(node)
        self.contexts[node] = Context(run_id=1, node_id=node, node_config={"partition-id": partition,
                                      "num-partitions": len(self.node_ids)}, state=RecordDict(), run_config={})
        return node

    def send_and_receive(self, messages, *, timeout=None):
        """Deliver each message to its node's handlers and collect the replies."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            rnd = msg.content.config_records.get("config", {}).get("server-round", 0) if msg.has_content() else 0
            if node in self.drop and self.drop[node](msg.metadata.message_type, rnd):
                continue
            md = msg.metadata
            delivered = Message(msg.content, metadata=Metadata(
                run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=node, reply_to_message_id="",
                group_id=md.group_id, created_at=time.time(), ttl=md.ttl, message_type=md.message_type,
                src_task_id=1, dst_task_id=2))
            self.sent.append(delivered)
            reply = self.app(delivered, self.contexts[node])
            if node in self.tamper:
                reply = self.tamper[node](reply)
            self.received.append(reply)
            replies.append(reply)
        return replies


def tiny_experiment(*, name: str | None = None, rounds: int = 2, batch_size: int = 8, local_epochs: int = 1,
                    bootstrap: int = 0, epochs: int = 1, split: dict | None = None, data: dict | None = None,
                    model: dict | None = None, train: dict | None = None, **fed) -> ExperimentConfig:
    """The tests' tiny experiment: a 16-dim UMEML, one local epoch, k = 5.

    ``split``, ``data``, ``model`` and ``train`` add or override keys of those sections; ``fed``
    adds or overrides ``federation`` keys.
    """
    return config_from_dict({
        **({"name": name} if name else {}),
        "seed": 0, "tasks": ["grade", "subtype", "survival"],
        **({"split": split} if split else {}),
        "data": {"max_patches": 32, **(data or {})},
        "model": {"hidden_dim": 16, "n_prototypes": 3, "n_registers": 2, "dropout": 0.0, "drop_path": 0.0,
                  **(model or {})},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 0.003, "bootstrap": bootstrap, **(train or {})},
        "federation": {"rounds": rounds, "local_epochs": local_epochs, "min_train_sites": 1, "k_min_patients": 5,
                       **fed},
    })


def spawn_logged(cmd, log: Path, cwd: Path) -> subprocess.Popen:
    """Start a deployment process (SuperLink, SuperNode, CLI) in its own session, output to ``log``."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def site_runtimes(data_dir, cfg: ExperimentConfig, sites=("A0", "A1"), dp=None, state_root=None, dp_seed=None):
    """Two (by default) in-process sites of the cohort at ``data_dir`` with the federation's
    preprocessing from their handshakes and aggregates, and freshly seeded global weights:
    ``(sites, preprocessing, weights)`` for tests that drive SiteRuntime directly."""
    import torch

    from umeml.data.cohort import load_data_dir
    from umeml.data.labels import subtype_codes
    from umeml.federation.protocol import check_handshakes, combine_preprocessing
    from umeml.federation.site import SiteRuntime
    from umeml.model import build_model
    from umeml.train.loop import task_heads

    cohort = load_data_dir(str(data_dir), cfg.data)
    runtimes = {s: SiteRuntime(s, cohort, cohort.site_indices(s), k_min=5, device="cpu", dp=dp,
                               state_dir=str(Path(state_root) / s) if state_root else None, dp_seed=dp_seed)
                for s in sites}
    first = runtimes[sites[0]].handshake()
    schema = check_handshakes({s: r.handshake() for s, r in runtimes.items()}, first["umeml_version"],
                              list(subtype_codes(cfg.data)))
    prep = combine_preprocessing({s: r.preprocess(cfg) for s, r in runtimes.items()}, schema,
                                 task_heads(cfg, len(schema["subtypes"])), cfg.survival.n_bins)
    torch.manual_seed(0)
    weights = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads).state_dict()
    return runtimes, prep, {k: v.clone() for k, v in weights.items()}


def stage_sites(tmp_path: Path, spec, experiment_yaml: str) -> list[str]:
    """A deployment's files under ``tmp_path``: the synthetic cohort of ``spec`` split into one
    data dir per site (``sites/<id>``), a site file each (``<id>.yaml``, k = 5, state under
    ``state/<id>``) and the experiment (``exp.yaml``); returns the site ids."""
    from umeml.data.synth import generate, split_by_site

    generate(spec, tmp_path / "all")
    ids = split_by_site(tmp_path / "all", tmp_path / "sites")
    for s in ids:
        (tmp_path / f"{s}.yaml").write_text(
            f"site_id: {s}\ndata_dir: sites/{s}\ndevice: cpu\nk_min_patients: 5\nstate_dir: state/{s}\n")
    (tmp_path / "exp.yaml").write_text(experiment_yaml)
    return ids

"""The coordinator's run: handshake, federated preprocessing, training rounds, held-out evaluation,
checkpoints after every round and resume from the last completed one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from umeml import __version__
from umeml.config import ExperimentConfig, config_to_dict, dump_config
from umeml.data.labels import subtype_codes
from umeml.data.site_norm import check_checkpoint
from umeml.errors import FederationError
from umeml.federation.checkpoint_prep import checkpoint_preprocessing, site_class_weights
from umeml.federation.partial import sent_keys
from umeml.federation.personalise import summarise_personalisation
from umeml.federation.privacy import central_entry, run_ledger
from umeml.federation.protocol import (
    SURVIVAL_GRID_TEXT,
    Preprocessing,
    check_handshakes,
    combine_preprocessing,
    combine_site_metrics,
)
from umeml.federation.schedule import round_settings
from umeml.federation.selection import RoundSelector
from umeml.federation.stats_release import checkpoint_standardisation, release_epsilons
from umeml.flower.records import arrays_from_state, state_from_arrays
from umeml.metrics.coverage import missing_class_messages
from umeml.model import build_model, save_checkpoint
from umeml.model.io import checkpoint_meta, init_from_checkpoint
from umeml.rundir import (
    PRIMARY_METRICS,
    FederatedFinal,
    RoundRecord,
    RunDir,
    SiteRoles,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    final_wave_rows,
    metric_entry,
    read_roles,
    write_final,
    write_metrics,
    write_roles,
)
from umeml.server.heldout import held_out_by_rule
from umeml.server.partial import complete_replies, expected_subset, merge_aggregate
from umeml.server.strategies import (
    NodeSubsetGrid,
    build_strategy,
    central_dp_wrapper,
    prepare_aggregation,
    restore_strategy_state,
    screen_update,
    strategy_state,
    with_central_dp,
)
from umeml.train.loop import task_heads

log = logging.getLogger("umeml.server")


def _query(grid, node_ids, kind: str, payload: dict, timeout: float, label=str) -> dict[int, dict]:
    """Send a query to nodes and return their JSON reports by node id (errors are logged,
    naming each node by ``label(node)``: its site id once the handshake told it)."""
    content = {"config": ConfigRecord({k: v for k, v in payload.items()})}
    msgs = [Message(RecordDict(content), dst_node_id=n, message_type=f"{MessageType.QUERY}.{kind}") for n in node_ids]
    out = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("%s answered %s with an error: %s", label(node), kind, reply.error.reason)
            continue
        out[node] = json.loads(str(reply.content["report"]["json"]))
    return out


def _registered_names(grid) -> dict[int, str]:
    """Node id -> the name its key was registered under, for nodes that have one.

    With SuperNode authentication each node is created by ``flwr supernode register KEY
    --name NAME`` (``umeml-server start --site-keys`` names it after the .pub file) and signs
    every request with that key, so the SuperLink's node record, which the ServerApp reads with
    ``grid.get_nodes()``, binds the node id to the name. Without authentication (and in
    simulation) nodes have no name and this is empty.
    """
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    try:
        infos = list(get_nodes())
    except Exception as err:  # noqa: BLE001 - the binding is a check on top; a grid without records has none
        log.warning("could not read the SuperLink's node records (%s); site ids are not checked against "
                    "registered key names", err)
        return {}
    return {int(i.node_id): str(i.name) for i in infos if i.HasField("name") and i.name}


def _name_mismatch(node: int, claimed: str, names: dict[int, str]) -> str | None:
    if node in names and names[node] != claimed:
        return (f"node {node} authenticated with the key registered as {names[node]!r} but its handshake claims "
                f"site id {claimed!r}; a site's site_id must equal the name its key was registered under "
                "(the .pub file name given to umeml-server start --site-keys)")
    return None


def _train_report(reply: Message) -> dict | None:
    """A training reply's JSON report (None for an error reply or one without a report)."""
    if reply.has_error() or "report" not in reply.content.config_records:
        return None
    try:
        return json.loads(str(reply.content["report"]["json"]))
    except (KeyError, ValueError):
        return None


def _slowest_compute(*reports: dict) -> float:
    """Seconds of the slowest site's local work in one wave: a training site's validation plus
    training (one reply), a held-out site's evaluation."""
    per_site: dict[str, float] = {}
    for r in reports:
        per_site[str(r.get("site"))] = per_site.get(str(r.get("site")), 0.0) + float(r.get("seconds") or 0.0)
    return max(per_site.values(), default=0.0)


def _validation_request(weights_round: int | None) -> dict:
    """Config keys asking a training site to validate the weights it receives before training
    (the one-wave round); empty when the received weights are not due for evaluation."""
    if weights_round is None:
        return {}
    return {"validate-part": "val", "validate-n-boot": 0, "validate-round": weights_round}


def _evaluate_messages(arrays, base_config: dict, targets: list[tuple[int, str]], weights_round: int,
                       n_boot: int) -> list[Message]:
    """Evaluate messages: each (node, part) scores ``arrays``, the global weights of ``weights_round``."""
    msgs = []
    for node, part in targets:
        conf = ConfigRecord({**base_config, "part": part, "n-boot": n_boot, "server-round": weights_round})
        msgs.append(Message(RecordDict({"arrays": arrays, "config": conf}), dst_node_id=node,
                            message_type=MessageType.EVALUATE))
    return msgs


def _evaluation(eval_replies: list[Message], validations: list[dict], weights_round: int, *, seed: int = 0,
                n_boot: int = 0, label: Callable[[int], str] = lambda node: f"node {node}") -> dict:
    """A round's evaluation record from evaluate replies and the validation reports that came
    inside training replies; ``weights_round`` names the global weights they all scored;
    ``seed``/``n_boot`` the site bootstrap of the combined metrics, ``label`` names a node by site."""
    held, val = {}, {}
    for reply in eval_replies:
        if reply.has_error():
            log.warning("evaluation error from %s: %s", label(reply.metadata.src_node_id), reply.error.reason)
            continue
        report = json.loads(str(reply.content["report"]["json"]))
        (held if report["part"] == "all" else val)[report["site"]] = report
    for report in validations:
        val[report["site"]] = report
    combine = lambda reports: combine_site_metrics(reports, seed=seed, n_boot=n_boot) if reports else {}  # noqa: E731
    return {"weights_round": weights_round, "held_out": held, "held_out_combined": combine(held),
            "validation": val, "validation_combined": combine(val)}


def _evaluation_compute(evaluation: dict) -> float:
    """Seconds of the slowest site's work in an evaluation wave."""
    return _slowest_compute(*evaluation.get("held_out", {}).values(), *evaluation.get("validation", {}).values())


@dataclass
class RunState:
    """What a checkpoint holds: enough to continue with nothing recomputed."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    seed: int = 0
    releases: list[dict] = field(default_factory=list)  # one-off releases (the survival histograms)
    # how the preprocessing merge used the sites' (noisy) statistics, for privacy.json whichever
    # releases there were (a run without survival has no histogram release to carry them)
    prep_notes: list[str] = field(default_factory=list)
    selection: dict = field(default_factory=dict)  # RoundSelector.state(): the best validated round so far


@dataclass
class _Run:
    """A run in progress: what its rounds share (the node lists change as sites come and go)."""

    state: RunState
    prep: Preprocessing
    strategy: object  # a Flower strategy, possibly inside the central-DP wrapper
    base_config: dict
    train_nodes: list[int]
    held_nodes: list[int]
    selector: RoundSelector | None = None


class Coordinator:
    """Runs one federated experiment against a Flower Grid and writes its run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, expected_sites: int | None = None,
                 held_out: tuple[str, ...] = (), resume: bool = False,
                 pooled_eval: Callable[[dict, Preprocessing], dict] | None = None,
                 wait_timeout: float = 300.0, printer: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.files = RunDir(self.run_dir)
        self.expected_sites = expected_sites
        self.held_out = tuple(held_out or cfg.split.test_sites)
        self.given_held_out = bool(held_out)  # given explicitly, not the config's default
        self.resume = resume
        self.pooled_eval = pooled_eval
        self.wait_timeout = wait_timeout
        self.print = printer
        self.nodes: dict[int, dict] = {}  # node id -> handshake
        self.refused: dict[int, str] = {}  # node id -> why its handshake was refused for good
        self.gone: set[int] = set()  # nodes of a site that disconnected (sent nothing until back)
        self.train_sites: list[str] = []
        self.recorded: SiteRoles | None = None  # the roles a resumed run keeps (roles.json)
        self.timeout = cfg.federation.round_timeout_s
        self.experiment_json = json.dumps(config_to_dict(cfg))

    # ----------------------------------------------------------------- setup
    def _wait_for_nodes(self, grid) -> list[int]:
        want = self.expected_sites or 1
        deadline = time.monotonic() + self.wait_timeout
        while True:
            ids = list(grid.get_node_ids())
            if len(ids) >= want:
                return ids
            if time.monotonic() > deadline:
                raise FederationError(f"only {len(ids)} of {want} sites connected within {self.wait_timeout:.0f} s")
            time.sleep(0.5)

    def _handshake(self, grid, node_ids) -> dict:
        replies = _query(grid, node_ids, "handshake", {"experiment": self.experiment_json}, self.timeout, self._label)
        missing = sorted(set(node_ids) - set(replies))
        if missing:  # no site id known yet: only Flower's node ids
            log.warning("%d node(s) did not answer the handshake: %s", len(missing), missing)
        replies = self._refuse_impostors(grid, replies)
        by_site = {}
        for reply in replies.values():
            if reply["site"] in by_site:
                raise FederationError(f"two nodes claim site {reply['site']!r}; site ids must be unique")
            by_site[reply["site"]] = reply
        self.nodes.update(replies)
        if not by_site:
            raise FederationError("no site answered the handshake")
        return check_handshakes(by_site, __version__, list(subtype_codes(self.cfg.data)))

    def _refuse_impostors(self, grid, replies: dict[int, dict]) -> dict[int, dict]:
        """The handshakes of nodes whose site id matches their registered key name; the others
        are refused for the rest of the run (logged with the site id they claimed) and the run
        goes on without them."""
        names = _registered_names(grid)
        kept = {}
        for node, reply in sorted(replies.items()):
            why = _name_mismatch(node, reply["site"], names)
            if why:
                self._refuse(grid, node, reply["site"], why)
                self._report(f"WARNING: site {reply['site']} (node {node}) refused: {why}")
            else:
                kept[node] = reply
        return kept

    def _refuse(self, grid, node: int, claimed: str, why: str) -> None:
        """Refuse a node for the rest of the run and tell it why: its site logs the reason and
        ``umeml-client start`` stops (a refused SuperNode would otherwise poll on for nothing)."""
        self.refused[node] = why
        log.error("handshake refused for site %s: %s", claimed, why)
        _query(grid, [node], "refused", {"experiment": self.experiment_json, "reason": why},
               min(self.timeout, 60.0), lambda n: f"refused site {claimed} (node {n})")

    def _label(self, node: int) -> str:
        """How log lines name a node: its site id, with the Flower node id."""
        site = self.nodes.get(node, {}).get("site")
        return f"site {site} (node {node})" if site else f"node {node} (no site id yet)"

    def _roles(self) -> tuple[list[int], list[int]]:
        sites = {r["site"]: n for n, r in self.nodes.items()}
        if not self.held_out and self.recorded is None:  # a new run naming none: split.n_test_sites
            self.held_out, line = held_out_by_rule(self.cfg, self.nodes)
            if line:
                self._report(line)
        unknown = sorted(set(self.held_out) - set(sites))
        if unknown:
            raise FederationError(f"held-out site(s) {unknown} did not join (joined: {sorted(sites)})")
        if self.recorded is not None:  # a resumed run: the sites that trained before, no others
            wanted = set(self.recorded.training)
        else:
            wanted = set(self.cfg.federation.train_sites) or (set(sites) - set(self.held_out))
        overlap = wanted & set(self.held_out)
        if overlap:
            raise FederationError(f"site(s) {sorted(overlap)} are both held out and training")
        missing = sorted(wanted - set(sites))
        if missing and self.recorded is None:
            raise FederationError(f"training site(s) {missing} did not join")
        if missing:  # a resumed run keeps its roles: an absent training site trains once it is back
            log.warning("training site(s) %s of this run are not connected; they train once they rejoin", missing)
        self.train_sites = sorted(wanted)
        train = [sites[s] for s in sorted(wanted) if s in sites]
        held = [sites[s] for s in sorted(self.held_out)]
        if not train:
            raise FederationError("no training site: every joined site is held out")
        return train, held

    def _restore_roles(self) -> None:
        """On resume, take the held-out and training sites from ``roles.json``: no held-out sites
        given means the recorded ones; different ones are an error, never a silent change."""
        if not self.resume:
            return
        self.recorded = read_roles(self.files)
        if self.recorded is None:
            return
        given = tuple(sorted(self.held_out))
        if self.given_held_out and given != self.recorded.held_out:
            raise FederationError(f"{self.files.roles}: this run holds out {list(self.recorded.held_out)}; "
                                  f"resuming it with held-out sites {list(given)} would change which sites train")
        self.held_out = self.recorded.held_out

    def _report(self, line: str) -> None:
        """Print a progress line and append it to progress.log (what `umeml-server start` shows)."""
        self.print(line)
        with self.files.progress.open("a") as f:
            f.write(line + "\n")

    def _site(self, node: int) -> str:
        return self.nodes[node]["site"]

    def _reply_site(self, reply: Message) -> str:
        """The site a reply came from (its node id where the node never said)."""
        node = reply.metadata.src_node_id
        return str(self.nodes.get(node, {}).get("site", node))

    # ------------------------------------------------------------- checkpoint
    def _save(self, state: RunState, prep: Preprocessing) -> None:
        payload = {"round": state.round, "weights": state.weights, "seed": state.seed, "history": state.history,
                   "releases": state.releases, "prep_notes": state.prep_notes, "selection": state.selection,
                   "strategy": {a: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()} for a, d in state.strategy.items()}}
        atomic_write(self.files.resume, lambda p: torch.save(payload, p))
        model = build_model(self.cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
        model.load_state_dict(state.weights)
        meta = {"experiment": self.cfg.name, "mode": "federated", "round": state.round, "umeml_version": __version__,
                "survival_edges": prep.survival_edges, "subtypes": prep.subtypes, "grades": prep.grades,
                "held_out_sites": list(self.held_out)}
        save_checkpoint(self.files.global_checkpoint, model, meta)  # atomic itself

    def _load(self) -> RunState:
        raw = torch.load(self.files.resume, weights_only=True)
        strategy = {a: {k: v.numpy() for k, v in d.items()} for a, d in raw["strategy"].items()}
        return RunState(int(raw["round"]), raw["weights"], strategy, list(raw["history"]), int(raw["seed"]),
                        releases=list(raw.get("releases", [])), selection=dict(raw.get("selection") or {}),
                        prep_notes=list(raw.get("prep_notes", [])))

    # ------------------------------------------------------------------- run
    def run(self, grid) -> dict:
        """Run (or resume) the experiment; returns final.json's content.

        Warnings (rejected updates, silent sites, evaluation errors) also go to
        ``coordinator.log`` in the run directory.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.files.coordinator_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            return self._run(grid)
        except Exception:
            log.exception("the run failed")
            raise
        finally:
            log.removeHandler(handler)
            handler.close()

    def _run(self, grid) -> dict:
        run = self._setup(grid)
        stop = None
        t0 = time.perf_counter()
        for rnd in range(run.state.round + 1, self.cfg.federation.rounds + 1):
            self._adopt_new_nodes(grid)
            run.train_nodes, run.held_nodes = self._roles_alive(grid, run.train_nodes, run.held_nodes)
            entry, stop = self._train_round(grid, rnd, run)
            if stop is not None:
                break
            # a round's wall time runs from where the previous one's ended: it includes that
            # round's checkpoint, metrics and progress writes, which would otherwise count nowhere
            t0 = self._finish_round(grid, entry, run, t0)
        state = run.state
        if stop is not None:
            self._final_evaluation_after_stop(grid, state, run.prep, run.base_config, run.train_nodes,
                                              run.held_nodes, stop)
        final = self._conclude(grid, run)
        write_final(self.files, final)
        return final.to_json()

    def _setup(self, grid) -> _Run:
        """Sites, roles, preprocessing and the starting weights (fresh, or the last completed round)."""
        cfg = self.cfg
        self._restore_roles()
        node_ids = self._wait_for_nodes(grid)
        schema = self._handshake(grid, node_ids)
        train_nodes, held_nodes = self._roles()
        write_roles(self.files, SiteRoles(tuple(sorted(self.held_out)), tuple(self.train_sites)), replace=not self.resume)
        self._report(f"sites: training {', '.join(self._site(n) for n in train_nodes)}; "
                     f"held out {', '.join(self._site(n) for n in held_nodes) or '-'}")
        prep_path = self.files.preprocessing
        if self.resume and prep_path.is_file() and self.files.resume.is_file():  # else no round completed
            prep = Preprocessing.from_json(prep_path.read_text())
            state = self._load()
        else:
            if cfg.federation.init_checkpoint:  # before any site releases statistics for this run
                check_checkpoint(checkpoint_meta(cfg.federation.init_checkpoint), cfg.data.site_standardise,
                                 cfg.federation.init_checkpoint)
            prep, releases, prep_notes = self._preprocess(grid, train_nodes, schema)
            atomic_write_text(prep_path, prep.to_json())
            atomic_write_text(self.files.config, dump_config(cfg))
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
            self._init_weights(model)
            state = RunState(0, {k: v.detach().clone() for k, v in model.state_dict().items()}, seed=cfg.seed,
                             releases=releases, prep_notes=prep_notes)
        strategy = with_central_dp(build_strategy(cfg.federation), cfg.federation, len(train_nodes))
        restore_strategy_state(strategy, state.strategy)
        base_config = {"experiment": self.experiment_json, "preprocessing": prep.to_json()}
        return _Run(state, prep, strategy, base_config, train_nodes, held_nodes, self._selector(state))

    def _init_weights(self, model) -> None:
        """Start from ``federation.init_checkpoint`` when set (a mismatch names every tensor)."""
        path = self.cfg.federation.init_checkpoint
        if path:
            init_from_checkpoint(model, path)
            self._report(f"initial weights: {path}")

    def _train_round(self, grid, rnd: int, run: _Run) -> tuple[dict | None, dict | None]:
        """Round ``rnd``'s training wave and aggregation: (the round's history entry, None), or
        (None, why training stops) when the central DP budget does not allow this round."""
        strategy, state = run.strategy, run.state
        arrays = arrays_from_state(state.weights, self.cfg.federation.fp16_transfer)
        selectable = NodeSubsetGrid(grid, run.train_nodes)
        n_selectable = len(selectable.get_node_ids())
        pending = self._pending_evaluation(state)  # the received weights' round, when due for evaluation
        train_config = ConfigRecord({**run.base_config, **_validation_request(pending),
                                     **round_settings(self.cfg.federation, rnd)})
        msgs = list(strategy.configure_train(rnd, arrays, train_config, selectable))
        sample_rate = len(msgs) / max(1, n_selectable)
        if central_dp_wrapper(strategy) is not None:
            stop = self._central_budget_stop(rnd, state.history, len(msgs), sample_rate)
            if stop is not None:
                return None, stop
        t_wave = time.perf_counter()
        replies = list(grid.send_and_receive(msgs + self._wave_evaluations(msgs, arrays, run, pending),
                                             timeout=self.timeout))
        train_wave = time.perf_counter() - t_wave
        replies, eval_reports = self._record_wave_evaluation(run, pending, replies)
        keys = sent_keys(self.cfg, run.prep)
        accepted, train_reports, privacy = self._screen_replies(rnd, replies, expected_subset(arrays, keys))
        for report in train_reports:  # validation reports are recorded with the round whose weights they score
            report.pop("validation", None)
        if len(accepted) >= self.cfg.federation.min_train_sites:
            # in site order, not arrival order: float sums of 3+ updates depend on their order, and
            # replies arrive as sites finish (Flower also shuffles the nodes it samples), so a
            # rerun with the same seed would not give the same weights
            accepted.sort(key=self._reply_site)
            prepare_aggregation(strategy, accepted)
            new_arrays, _ = strategy.aggregate_train(rnd, complete_replies(accepted, arrays))
            if new_arrays is not None:
                state.weights = merge_aggregate(state.weights, state_from_arrays(new_arrays, state.weights), keys)
                if central_dp_wrapper(strategy) is not None:
                    privacy.append(self._central_release(rnd, state.history, len(accepted), sample_rate))
        else:
            log.warning("round %d: %d accepted update(s) < federation.min_train_sites=%d; global weights kept",
                        rnd, len(accepted), self.cfg.federation.min_train_sites)
        entry = {"round": rnd, "train": train_reports, "accepted": len(accepted), "evaluation": {}}
        if privacy:
            entry["privacy"] = privacy
        entry["train_wave_seconds"] = round(train_wave, 2)
        entry["wave_compute_seconds"] = [round(_slowest_compute(*train_reports, *eval_reports), 3)]
        return entry, None

    # ------------------------------------------------------ one wave per round
    def _pending_evaluation(self, state: RunState) -> int | None:
        """The round whose global weights the next wave sends, when they are due for evaluation
        and not evaluated yet (None otherwise). Round r's weights are scored in round r + 1's
        wave (training sites validate them before training, held-out sites evaluate them), the
        last round's in the final evaluation wave; a resumed run evaluates what its last
        checkpoint left unevaluated."""
        if not state.history:
            return None
        last = state.history[-1]
        # best-round selection needs every round's validation, so every round is evaluated then
        due = state.round % self.cfg.federation.evaluate_every == 0 or self.cfg.federation.selection == "best_validation"
        if last["round"] != state.round or last.get("evaluation") or not due:
            return None
        return state.round

    def _wave_evaluations(self, train_msgs: list[Message], arrays, run: _Run, pending: int | None) -> list[Message]:
        """Evaluate messages riding in a training wave: held-out sites, and training sites the
        strategy did not sample this round (they validate without training)."""
        if pending is None:
            return []
        sampled = {m.metadata.dst_node_id for m in train_msgs}
        targets = [(n, "all") for n in run.held_nodes] + [(n, "val") for n in run.train_nodes if n not in sampled]
        return _evaluate_messages(arrays, run.base_config, targets, pending, 0)

    def _record_wave_evaluation(self, run: _Run, pending: int | None,
                                replies: list[Message]) -> tuple[list[Message], list[dict]]:
        """Split a wave's replies into the training replies (returned) and the evaluation of the
        weights the wave sent, recorded in round ``pending``'s history entry; also returns that
        evaluation's site reports (for the wave's compute time)."""
        train, evals, validations = [], [], []
        for reply in replies:
            if reply.metadata.message_type == MessageType.EVALUATE:
                evals.append(reply)
                continue
            train.append(reply)
            report = _train_report(reply)
            if report is not None and isinstance(report.get("validation"), dict):
                validations.append(report["validation"])
        if pending is None:
            return train, []
        evaluation = _evaluation(evals, validations, pending)
        evaluation["wave"] = pending + 1
        self._record_evaluation(run, pending, evaluation)
        return train, [*evaluation["held_out"].values(), *evaluation["validation"].values()]

    def _record_evaluation(self, run: _Run, rnd: int, evaluation: dict) -> None:
        """Put the evaluation of round ``rnd``'s global weights (``run.state.weights`` at this
        call: the next aggregation has not happened yet) into that round's history entry."""
        entry = next(e for e in reversed(run.state.history) if e["round"] == rnd)
        entry["evaluation"] = evaluation

    @staticmethod
    def _previous_evaluated(state: RunState, rnd: int) -> dict | None:
        """The history entry whose evaluation round ``rnd``'s wave carried (None when none did)."""
        if state.history and state.history[-1].get("evaluation", {}).get("wave") == rnd:
            return state.history[-1]
        return None

    def _screen_replies(self, rnd: int, replies: list[Message], arrays) -> tuple[list[Message], list[dict], list[dict]]:
        """The training replies that may enter the aggregate, every site's training report (why
        it did not train, why its update was rejected) and the sites' local-DP ledger entries."""
        accepted, train_reports, privacy = [], [], []
        for reply in replies:
            site = self._reply_site(reply)
            report = _train_report(reply)
            if report is not None and isinstance(report.get("privacy"), dict):
                privacy.append({**report["privacy"], "site": site})
            if report is not None and "skipped" in report:  # e.g. the site's privacy budget is spent
                log.warning("round %d: site %s did not train: %s", rnd, site, report["skipped"])
                train_reports.append(report)
                continue
            reason = screen_update(reply, arrays, self.cfg.federation.max_update_norm)
            if reason:
                log.warning("round %d: update from site %s rejected: %s", rnd, site, reason)
                train_reports.append({"site": site, "rejected": reason})
                continue
            accepted.append(reply)
            train_reports.append(report if report is not None else {"site": site})
        return accepted, train_reports, privacy

    def _finish_round(self, grid, entry: dict, run: _Run, t0: float) -> float:
        """Evaluate when due, then record the round: history, checkpoint, metrics, privacy, progress;
        returns the moment its wall time (``entry["seconds"]``, from ``t0``) was taken."""
        rnd, state = entry["round"], run.state
        evaluated = self._previous_evaluated(state, rnd)
        if evaluated is not None:  # this wave carried the validation of round rnd - 1's weights
            self._observe_validation(run, evaluated)
        run.selector.offer(rnd, state.weights)  # a candidate until its validation arrives (next wave)
        state.history.append(entry)
        state.round = rnd
        if rnd == self.cfg.federation.rounds:  # the final evaluation wave, on the last round's weights
            entry["evaluation"] = self._evaluate(grid, state.weights, run.base_config, run.train_nodes,
                                                 run.held_nodes, rnd, True)
            entry["wave_compute_seconds"].append(round(_evaluation_compute(entry["evaluation"]), 3))
            if self.pooled_eval is not None:
                entry["evaluation"]["pooled"] = self.pooled_eval(state.weights, run.prep)
            evaluated = entry
            self._observe_validation(run, entry)
        t_end = time.perf_counter()
        entry["seconds"] = round(t_end - t0, 2)
        entry["overhead_seconds"] = round(entry["seconds"] - sum(entry["wave_compute_seconds"]), 2)
        state.strategy = strategy_state(run.strategy)
        self._save(state, run.prep)
        self._write_metrics(state.history)
        self._write_privacy(state)
        self._report(self._progress_line(entry, evaluated))
        return t_end

    def _adopt_new_nodes(self, grid) -> None:
        """Handshake nodes that joined (or rejoined after a restart) since the last round.

        A node whose site id differs from its registered key name is refused for the rest of the
        run; one claiming the site id of a node that is still connected is refused (and asked
        again next round): it may take over the site id only once the other has gone.
        """
        alive = list(grid.get_node_ids())
        new = [n for n in alive if n not in self.nodes and n not in self.refused]
        if new:
            replies = _query(grid, new, "handshake", {"experiment": self.experiment_json}, self.timeout)
            names = _registered_names(grid) if replies else {}
            for node, reply in replies.items():
                claimed = reply["site"]
                why = _name_mismatch(node, claimed, names)
                if why:
                    self._refuse(grid, node, claimed, why)
                    continue
                holders = [n for n, r in self.nodes.items() if r["site"] == claimed]
                live = [n for n in holders if n in alive]
                if live:
                    log.error("handshake refused: node %s claims site id %r, which node %s (still connected) holds; "
                              "site ids must be unique, a rejoining site takes over only after the old node is gone",
                              node, claimed, live[0])
                    continue
                for n in holders:
                    del self.nodes[n]
                self.nodes[node] = reply
                log.info("site %s (re)joined as node %s", claimed, node)

    def _roles_alive(self, grid, train_nodes, held_nodes):
        """This round's training and held-out nodes, connected ones only: a site whose node has
        gone (no heartbeat) gets no message until it rejoins."""
        try:
            train_nodes, held_nodes = self._roles()
        except FederationError as err:
            log.warning("%s; continuing with the sites still connected", err)
        alive = set(grid.get_node_ids())
        for node in train_nodes + held_nodes:
            gone = node not in alive
            if gone != (node in self.gone):
                log.warning("%s %s", self._label(node), "has gone (no heartbeat): no messages until it rejoins"
                            if gone else "is connected again")
                self.gone.symmetric_difference_update({node})
        return [n for n in train_nodes if n in alive], [n for n in held_nodes if n in alive]

    def _evaluate(self, grid, weights, base_config, train_nodes, held_nodes, rnd: int, last: bool) -> dict:
        """The final evaluation wave (after the last round, or when training stops): every site
        scores ``weights``, the global weights of round ``rnd``."""
        arrays = arrays_from_state(weights, self.cfg.federation.fp16_transfer)
        n_boot = self.cfg.train.bootstrap if last else 0
        alive = set(grid.get_node_ids())  # a site gone since the round began gets no message
        msgs = _evaluate_messages(arrays, base_config, [(n, "all") for n in held_nodes if n in alive] +
                                  [(n, "val") for n in train_nodes if n in alive], rnd, n_boot)
        evaluation = _evaluation(list(grid.send_and_receive(msgs, timeout=self.timeout)), [], rnd,
                                 seed=self.cfg.seed, n_boot=n_boot, label=self._label)
        if last:
            for line in missing_class_messages(evaluation["held_out_combined"], self._classes(), "the held-out sites"):
                log.warning("%s", line)
        return {**evaluation, "wave": "final"}

    def _classes(self) -> dict[str, list[str]]:
        return {"grade": list(self.cfg.data.grades), "subtype": list(subtype_codes(self.cfg.data))}

    def _preprocess(self, grid, train_nodes, schema) -> tuple[Preprocessing, list[dict], list[str]]:
        """Query the training sites' aggregates and combine them; returns the preprocessing, the
        record of the one-off releases (survival histograms, the sites' class counts and genomic
        moments) and the notes of the merge (both for privacy.json)."""
        cfg = self.cfg
        eps = cfg.federation.survival_hist_epsilon
        survival = "survival" in cfg.tasks  # without the task no site sends a histogram
        if eps is None and survival and not cfg.federation.preprocessing_from_checkpoint:
            msg = ("federation.survival_hist_epsilon is null: every training site sends its EXACT survival histogram, "
                   f"which places each uncensored patient's survival time within one cell ({SURVIVAL_GRID_TEXT})")
            log.warning(msg)
            self._report("WARNING: " + msg)
        heads = task_heads(cfg, len(schema["subtypes"]))
        replies = _query(grid, train_nodes, "preprocess", {"experiment": self.experiment_json}, self.timeout,
                         self._label)
        by_site = {self._site(n): r for n, r in replies.items()}
        # each site's DP releases of class counts and genomic moments, as it described them
        site_releases = [{**r, "site": s} for s, rep in sorted(by_site.items()) for r in rep.get("releases", [])]
        notes: list[str] = []
        if cfg.federation.preprocessing_from_checkpoint:  # bins and scale: the public model's; weights: the sites'
            prep = checkpoint_preprocessing(cfg.federation.init_checkpoint, schema, heads, cfg.survival.n_bins,
                                            site_class_weights(by_site, heads, notes), notes)
            for note in notes:
                self._report(f"preprocessing: {note}")
            return prep, site_releases, notes
        prep = combine_preprocessing(by_site, schema, heads, cfg.survival.n_bins, notes)
        if cfg.federation.genomics_from_checkpoint:  # the public scale, no genomic release
            prep = checkpoint_standardisation(prep, cfg.federation.init_checkpoint, notes)
        for note in notes:
            log.warning("preprocessing: %s", note)
        # each site noised its histogram at its own resolved epsilon ("auto" scales with its total)
        by_eps = {s: r.get("survival_hist_epsilon") for s, r in by_site.items() if "survival_hist" in r}
        eps = self._histogram_epsilon(by_eps)
        release = {"kind": "survival_histogram", "epsilon": eps, "delta": 0.0 if eps is not None else None,
                   "epsilon_by_site": dict(sorted(by_eps.items())),
                   "mechanism": "two-sided geometric noise per cell, L1 sensitivity 1" if eps is not None
                   else "none (exact counts)", "grid": SURVIVAL_GRID_TEXT,
                   "sites": sorted(s for s, r in by_site.items() if not r.get("suppressed")),
                   "survival_edges": prep.survival_edges}
        return prep, ([release] if survival else []) + site_releases, notes

    def _histogram_epsilon(self, by_site: dict[str, float | None]) -> float | None:
        """The survival histograms' epsilon for privacy.json: the largest a site used (None: some
        site sent exact counts); with no histogram sent, what the federation's setting resolves to."""
        if not by_site:
            local = self.cfg.federation.local_dp
            return release_epsilons(self.cfg.federation, local.target_epsilon if local.enabled else None).survival_hist
        values = list(by_site.values())
        return None if None in values else max(values)

    def _central_budget_stop(self, rnd: int, history: list[dict], n_sites: int, sample_rate: float) -> dict | None:
        """Why training must stop before round ``rnd`` (None: go on): the central release of this
        round would take epsilon beyond ``federation.central_dp.target_epsilon``. Epsilon comes
        from the same accountant as the ledger's entries."""
        cdp = self.cfg.federation.central_dp
        if cdp.target_epsilon is None:
            return None
        earlier = [p for e in history for p in e.get("privacy", []) if p.get("kind") == "central"]
        after = self._central_release(rnd, history, max(1, n_sites), sample_rate)["epsilon"]
        if after <= cdp.target_epsilon:
            return None
        spent = earlier[-1]["epsilon"] if earlier else 0.0
        reason = (f"central DP budget: round {rnd} would take epsilon from {spent:.4g} to {after:.4g} > "
                  f"federation.central_dp.target_epsilon {cdp.target_epsilon:g} (delta {cdp.delta:g}); "
                  f"training stopped after round {rnd - 1}, final evaluation of the round-{rnd - 1} weights")
        log.warning(reason)
        self._report(reason)
        return {"before_round": rnd, "reason": reason, "epsilon": spent, "epsilon_after_next_round": after,
                "target_epsilon": cdp.target_epsilon, "delta": cdp.delta}

    def _final_evaluation_after_stop(self, grid, state: RunState, prep: Preprocessing, base_config: dict,
                                     train_nodes, held_nodes, stop: dict) -> None:
        """Evaluate the last weights as a run's last round would (bootstrap CIs, pooled metrics)
        and record the stop in the last round's entry (a round-0 entry when none trained)."""
        if state.history:
            entry = state.history[-1]
        else:
            entry = {"round": 0, "train": [], "accepted": 0, "evaluation": {}, "seconds": 0.0}
            state.history.append(entry)
        entry["evaluation"] = self._evaluate(grid, state.weights, base_config, train_nodes, held_nodes,
                                             state.round, True)
        if self.pooled_eval is not None:
            entry["evaluation"]["pooled"] = self.pooled_eval(state.weights, prep)
        entry["stopped"] = stop
        self._save(state, prep)
        self._write_metrics(state.history)
        self._write_privacy(state)

    def _central_release(self, rnd: int, history: list[dict], n_sites: int, sample_rate: float) -> dict:
        """Ledger entry of this round's central-DP release (epsilon over all releases so far)."""
        cdp = self.cfg.federation.central_dp
        earlier = [p for e in history for p in e.get("privacy", []) if p.get("kind") == "central"]
        return central_entry(rnd, earlier, cdp.noise_multiplier, cdp.clipping_norm, round(sample_rate, 6),
                             n_sites, cdp.delta, cdp.clipping)

    # ---------------------------------------------------------------- output
    def _privacy_ledger(self, state: RunState) -> dict | None:
        fed = self.cfg.federation
        history, releases = state.history, state.releases
        if not (fed.local_dp.enabled or fed.central_dp.enabled or releases or any(e.get("privacy") for e in history)):
            return None
        stopped = history[-1].get("stopped") if history else None
        return run_ledger(self.cfg.name, config_to_dict(fed.local_dp),
                          config_to_dict(fed.central_dp) if fed.central_dp.enabled else None, history,
                          releases, stopped, state.prep_notes)

    def _write_privacy(self, state: RunState) -> None:
        """The run's privacy ledger, privacy.json: every site's local-DP entries, the central
        releases per round and the one-off survival-histogram release (rebuilt from the history,
        so a resumed run keeps the earlier rounds) and the notes of the preprocessing merge."""
        ledger = self._privacy_ledger(state)
        if ledger is not None:
            atomic_write_json(self.files.privacy, ledger)

    def _write_metrics(self, history: list[dict]) -> None:
        write_metrics(self.files.metrics, [row for e in history for row in RoundRecord.from_json(e).metric_rows()])

    def _progress_line(self, entry: dict, evaluated: dict | None = None) -> str:
        """One line per round; the held-out metrics are those recorded in this round's waves
        (``evaluated``: the previous round's, or this round's after the final wave), labelled
        with the round of the weights they score when that is not this round."""
        losses = [r["train_loss"] for r in entry["train"] if "train_loss" in r]
        parts = [f"round {entry['round']}/{self.cfg.federation.rounds}",
                 f"train loss {np.mean(losses):.3f} ({len(losses)} site(s))" if losses else "no accepted update"]
        evaluated = evaluated or entry
        comb = evaluated["evaluation"].get("held_out_combined", {})
        shown = []
        for task, key in PRIMARY_METRICS:
            m = metric_entry(comb, task, key)
            if m:
                shown.append(f"{task} {key} {m['value']:.3f}")
        if shown:
            label = "held-out" if evaluated is entry else f"held-out (round {evaluated['round']} weights)"
            parts.append(label + " " + ", ".join(shown))
        # a site's total (DP-SGD with its one-off releases) where it reports one
        eps = [(p.get("kind"), p.get("epsilon_total", p.get("epsilon"))) for p in entry.get("privacy", [])]
        local = [e for k, e in eps if k == "local" and isinstance(e, (int, float))]
        central = [e for k, e in eps if k == "central"]
        if local:
            parts.append(f"local epsilon <= {max(local):.2f}")
        if central:
            parts.append(f"central epsilon {central[-1]:.2f}")
        parts.append(f"{entry['seconds']:.1f} s")
        return " | ".join(parts)

    def _final(self, state: RunState) -> FederatedFinal:
        rounds = [RoundRecord.from_json(e) for e in state.history]
        last_eval = next((r.evaluation for r in reversed(rounds) if r.evaluation), {})
        return FederatedFinal(
            experiment=self.cfg.name,
            strategy=self.cfg.federation.strategy,
            model=self.cfg.model.name,
            umeml_version=__version__,
            seed=self.cfg.seed,
            rounds=state.round,
            held_out_sites=list(self.held_out),
            training_sites=list(self.train_sites),
            held_out=last_eval.get("held_out", {}),
            held_out_combined=last_eval.get("held_out_combined", {}),
            pooled=last_eval.get("pooled"),
            seconds_per_round=[r.seconds for r in rounds],
            overhead_seconds_per_round=[r.overhead_seconds for r in rounds],
            privacy=(self._privacy_ledger(state) or {}).get("final"),
            stopped=rounds[-1].stopped if rounds else None,
        )

    # ------------------------------------------------- model selection and personalisation
    def _selector(self, state: RunState) -> RoundSelector:
        """The run's model-selection rule, continued from a resumed run's record; the current
        weights are a candidate until their validation arrives."""
        fed = self.cfg.federation
        selector = RoundSelector(fed.selection, fed.k_min_patients)
        selector.restore(state.selection)
        if state.round > 0 and state.round not in selector.scores:
            selector.offer(state.round, state.weights)
        return selector

    def _observe_validation(self, run: _Run, entry: dict) -> None:
        """Hand the selector the validation reports ``entry`` carries, for the round of the
        weights they evaluate (``weights_round``: round r's weights are validated in round
        r + 1's wave, the last round's in the final wave); the weights themselves were offered
        when their round ended."""
        ev = entry.get("evaluation") or {}
        if ev.get("validation"):
            ev.setdefault("weights_round", entry["round"])
            score = run.selector.observe(int(ev["weights_round"]), ev["validation"])
            if score is not None:
                ev["selection_score"] = score
        run.state.selection = run.selector.state()

    def _conclude(self, grid, run: _Run) -> FederatedFinal:
        """final.json after the last round: the selected round's weights (evaluated again on
        the held-out sites when they are not the last round's) and the personalisation wave."""
        state = run.state
        rnd, weights, selection = run.selector.result(state.round, state.weights)
        if rnd != state.round:
            ev = self._evaluate(grid, weights, run.base_config, [], run.held_nodes, rnd, True)
            if self.pooled_eval is not None:
                ev["pooled"] = self.pooled_eval(weights, run.prep)
            selection["evaluation"] = ev
        self._save_selected(weights, run.prep, rnd)
        self._report(_selection_line(selection))
        personal = self._personalise(grid, run, weights)
        final = self._final(state)
        ev = selection.get("evaluation")
        if ev is not None:
            final.held_out, final.held_out_combined = ev.get("held_out", {}), ev.get("held_out_combined", {})
            final.pooled = ev.get("pooled", final.pooled)
        final.selection, final.personalisation = selection, personal
        rows = [row for e in state.history for row in RoundRecord.from_json(e).metric_rows()]
        write_metrics(self.files.metrics, rows + final_wave_rows(selection, personal))
        return final

    def _save_selected(self, weights: dict, prep: Preprocessing, rnd: int) -> None:
        """The selected global weights as the run's best checkpoint (``checkpoints/best.pt``)."""
        model = build_model(self.cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
        model.load_state_dict(weights)
        meta = {"experiment": self.cfg.name, "mode": "federated", "round": rnd, "umeml_version": __version__,
                "selection": self.cfg.federation.selection, "survival_edges": prep.survival_edges,
                "subtypes": prep.subtypes, "grades": prep.grades, "held_out_sites": list(self.held_out)}
        save_checkpoint(self.files.best_checkpoint, model, meta)

    def _personalise(self, grid, run: _Run, weights: dict) -> dict | None:
        """The personalisation wave (``federation.personalise_epochs`` > 0): every training site
        fine-tunes the heads of ``weights`` and reports global vs personalised validation
        metrics; no weights come back."""
        epochs = self.cfg.federation.personalise_epochs
        if not epochs:
            return None
        arrays = arrays_from_state(weights, self.cfg.federation.fp16_transfer)
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**run.base_config, "epochs": epochs})}),
                        dst_node_id=n, message_type=f"{MessageType.QUERY}.personalise") for n in run.train_nodes]
        reports = {}
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                log.warning("personalisation error from node %s: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            report = json.loads(str(reply.content["report"]["json"]))
            reports[report["site"]] = report
        summary = summarise_personalisation(reports, epochs)
        for line in _personalisation_lines(summary):
            self._report(line)
        return summary


def _selection_line(selection: dict) -> str:
    """The progress line saying which round's weights are the result."""
    if "score" in selection:
        return (f"model selection ({selection['rule']}): round {selection['round']} of {selection['last_round']}, "
                f"validation score {selection['score']:.3f} over {selection['n_validation']} patients at "
                f"{selection['sites']} site(s)")
    return f"model selection ({selection['rule']}): round {selection['round']} ({selection.get('note', '')})"


def _personalisation_lines(summary: dict) -> list[str]:
    """Progress lines of the personalisation wave: per site and combined, global -> personalised."""
    def pair(g: dict, p: dict) -> str:
        cells = []
        for task, key in PRIMARY_METRICS:
            a, b = metric_entry(g, task, key), metric_entry(p, task, key)
            if a and b:
                cells.append(f"{task} {key} {a['value']:.3f} -> {b['value']:.3f}")
        return ", ".join(cells) or "-"

    how = "guarded, up to" if summary.get("guarded") else "every head,"
    lines = [f"personalisation (heads, {how} {summary['epochs']} epoch(s)), own validation, global -> personalised:"]
    for site, rep in sorted(summary["sites"].items()):
        if rep.get("suppressed") or "global" not in rep:
            lines.append(f"  {site}: n {rep.get('n')} ({rep.get('skipped') or '< k: suppressed'})")
        else:
            heads = ", ".join(f"{g} {e}" for g, e in (rep.get("heads") or {}).items())
            lines.append(f"  {site} (n {rep['n']}; epochs per head, 0 = global: {heads or '-'}): "
                         f"{pair(rep['global']['tasks'], rep['personalised']['tasks'])}")
    if "global_combined" in summary:
        lines.append(f"  combined over {summary['n_sites']} site(s), n {summary['n_validation']}: "
                     f"{pair(summary['global_combined'], summary['personalised_combined'])}")
    return lines

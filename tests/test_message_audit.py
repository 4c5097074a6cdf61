"""Message audit (issue 5, item 5): every message of a federated run, in both directions, is
walked and checked for patient-level content.

The run: the real Coordinator and the real ClientApp handlers over the in-process LocalGrid
(handshake, preprocessing, 2 training rounds, evaluation with bootstrap CIs, best-round selection,
the personalisation wave), 5 nodes:

====  =========  ===========================================================  =========
node  site       patients                                                     role
====  =========  ===========================================================  =========
101   A0         A0's 20                                                      training
102   A1         A1's 20, only 2 of them with genomics (< k)                  training
103   A2         A2's 20                                                      held out
104   S1         2 of A1's patients (< k)                                     training
105   S2         2 of A2's patients (< k)                                     held out
====  =========  ===========================================================  =========

with ``federation.k_min_patients`` = 3. Every record of every message is walked: ArrayRecord
keys (and shapes), ConfigRecord values (JSON strings parsed recursively), MetricRecord keys and
values. The rules checked:

1. **Identifiers and paths**: no string anywhere (record keys, values, JSON keys and values)
   contains a case id, a slide id, the cohort folder or a bag file path or name.
2. **Allowlisted fields** (site -> coordinator): every leaf of a reply is at a known aggregate
   path (a count, a sum, a metric of n patients, the site's schema), every list has its fixed
   length (classes, genes, grid cells: never one entry per patient), and the weights are
   exactly the model's keys and shapes. A new field fails here until it is reviewed and added.
3. **Survival times**: no float equals (within 1e-6, relative) the survival time of a patient
   of the sending site (of any patient for coordinator -> site messages). Exempt, each for a
   stated reason: the coordinator's own settings (``config.experiment``, and the round/part
   controls), which no patient data reaches; wall-clock ``seconds``; ``survival_edges``, checked
   to be points of the public survival grid; ``class_weights``, checked to be the function of the
   sites' reported class counts; and values in [0, 1] equal to a ratio a/b with b <= n (the
   count-based metrics of n patients, whose coincidence with a short survival time is
   arithmetic, not a leak).
4. **Predictions**: the sites' per-patient outputs (class probabilities, risks) are recorded as
   they are computed; no float in any message equals one of them (exact float32 values, which
   is what a ``float(p)`` leak carries; simple dyadic values such as 0.5 are exempt).
5. **Genomics**: no reported list equals a patient's genomic profile or its square; genomic
   moments are sent only over >= k patients with genomics.
6. **k-suppression**: a site (or evaluated part) with fewer than k patients sends only its count
   (handshake: schema and the patient count, modality presence as 0/1; preprocess and evaluate:
   ``{site, n, suppressed}``).
7. **Survival histogram**: the preprocessing histogram of uncensored survival times (46 cells,
   3 months wide up to 60 months) carries two-sided geometric noise
   (``federation.survival_hist_epsilon``, 1.0 here), so it is not the exact histogram and does
   not list the patients' survival months. (This was a known gap, a strict xfail, while the
   histogram had exact 1-month cells.)

8. **DP statistics** (the same federation under local DP, ``dp_audit``): no exact class count
   or genomic moment leaves a training site (``federation.stats_privacy`` follows local DP), the
   handshake carries no class counts and modality presence as 0/1 only, each preprocess reply
   describes its releases (allowlisted fields), and the run's ledger lists every release per
   site under one total epsilon.

A training site below k patients does not train and reports only why. The personalisation wave
(``query.personalise``) sends the global weights to the training sites; its replies carry
validation metrics of the global and the personalised heads and never weights (rule 2: only
``train`` replies carry arrays).
"""

from __future__ import annotations

import dataclasses
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

import umeml.federation.personalise as personalise_module
import umeml.federation.site as site_module
from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.bags import bag_path
from umeml.data.cohort import load_data_dir
from umeml.data.source import CohortSource
from umeml.federation.protocol import survival_grid
from umeml.federation.scaffold import CONTROL_DELTA, SERVER_CONTROL
from umeml.server.coordinator import Coordinator
from umeml.train.losses import class_weights_from_counts

from fed_helpers import LocalGrid, tiny_experiment

K = 3
HELD_OUT = ("A2", "S2")
MESSAGE_TYPES = {"query.handshake", "query.preprocess", "train", "evaluate", "query.personalise"}


class AuditSites:
    """The five nodes of the module docstring; remembers each site's patients."""

    def __init__(self, data_dir: str, state_root: str | None = None):
        self.base = SimulatedSites(("A0", "A1", "A2", "A1", "A2"), CohortSource(data_dir=data_dir),
                                   state_root=state_root)
        self.runtimes: dict[str, site_module.SiteRuntime] = {}
        self._sparse = None

    def _sparse_genomics(self, cohort, indices):
        if self._sparse is None:
            has = cohort.has_genomics.copy()
            keep = [i for i in indices if has[i]][:2]
            drop = [i for i in indices if i not in keep]
            has[drop] = False
            genomics = cohort.genomics.copy()
            genomics[drop] = 0.0
            self._sparse = dataclasses.replace(cohort, has_genomics=has, genomics=genomics)
        return self._sparse

    def __call__(self, context, cfg):
        part = int(context.node_config["partition-id"])
        rt = self.base(context, cfg)
        if part == 1:
            rt = dataclasses.replace(rt, cohort=self._sparse_genomics(rt.cohort, rt.indices))
        elif part == 3:
            rt = dataclasses.replace(rt, site_id="S1", indices=rt.indices[:2])
        elif part == 4:
            rt = dataclasses.replace(rt, site_id="S2", indices=rt.indices[:2])
        self.runtimes[rt.site_id] = rt
        return rt


def _experiment():
    return tiny_experiment(bootstrap=20, k_min_patients=K, selection="best_validation", personalise_epochs=1,
                           lr_schedule="cosine")


@dataclasses.dataclass
class Audit:
    grid: LocalGrid
    sites: AuditSites
    cohort: object  # the whole cohort, as loaded from disk
    data_dir: Path
    predictions: list  # every Predictions a site computed
    run_dir: Path

    def site_of(self, node: int) -> str:
        """The site a node played (from its handshake reply)."""
        for m in self.grid.received:
            if m.metadata.message_type == "query.handshake" and m.metadata.src_node_id == node:
                return json.loads(str(m.content["report"]["json"]))["site"]
        raise KeyError(node)

    def patients(self, site: str) -> list:
        rt = self.sites.runtimes[site]
        return [rt.cohort.patients[i] for i in rt.indices]


def run_audit(data_dir, run_dir, tamper=None, experiment=None, state_root=None) -> Audit:
    """Run the federation of the module docstring and keep everything the audit needs
    (``tamper``: LocalGrid's per-node reply hooks, to check that the audit catches leaks)."""
    recorded = []
    real_predict = site_module.predict
    assert personalise_module.predict is real_predict

    def recording_predict(*args, **kwargs):
        preds = real_predict(*args, **kwargs)
        recorded.append(preds)
        return preds

    sites = AuditSites(str(data_dir), state_root)
    grid = LocalGrid(build_client_app(sites), 5, tamper=tamper)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site_module, "predict", recording_predict)
        mp.setattr(personalise_module, "predict", recording_predict)
        coord = Coordinator(experiment or _experiment(), run_dir, expected_sites=5, held_out=HELD_OUT, wait_timeout=5,
                            printer=lambda s: None)
        final = coord.run(grid)
    assert final["rounds"] == 2 and sorted(final["training_sites"]) == ["A0", "A1", "S1"]
    return Audit(grid, sites, load_data_dir(data_dir), Path(data_dir), recorded, Path(run_dir))


@pytest.fixture(scope="module")
def audit(tiny_cohort_dir, tmp_path_factory):
    return run_audit(tiny_cohort_dir, tmp_path_factory.mktemp("audit") / "run")


# ------------------------------------------------------------------------------ walking
def _json_or_none(text: str):
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return None
    return None


def _walk_value(value, path: str, out: list, keys: list):
    """Leaves (path, value) of a record value; strings holding JSON are parsed recursively."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        parsed = _json_or_none(value)
        if parsed is not None:
            _walk_value(parsed, path, out, keys)
            return
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            keys.append((path, str(k)))
            _walk_value(v, f"{path}.{k}", out, keys)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_value(v, f"{path}[]", out, keys)
    else:
        out.append((path, value))


def walk(msg) -> tuple[list, list, dict]:
    """(leaves, keys, arrays) of a message: leaves are (path, scalar) with paths like
    ``report.json.tasks.grade.auc_macro.value``; keys are every record and JSON key; arrays
    maps ``record.key`` to the numpy array."""
    leaves, keys, arrays = [], [], {}
    for name, record in msg.content.items():
        keys.append(("", name))
        if isinstance(record, ArrayRecord):
            for k, arr in record.items():
                keys.append((name, k))
                arrays[f"{name}.{k}"] = arr.numpy()
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for k, v in record.items():
                keys.append((name, k))
                _walk_value(v, f"{name}.{k}", leaves, keys)
        else:  # a record type this audit does not know must not pass unseen
            raise AssertionError(f"unknown record type {type(record).__name__} in {msg.metadata.message_type}")
    return leaves, keys, arrays


def all_messages(audit):
    return [("sent", m) for m in audit.grid.sent] + [("received", m) for m in audit.grid.received]


# ------------------------------------------------------------------------------ coverage
def test_every_message_type_is_captured_in_both_directions(audit):
    sent = {m.metadata.message_type for m in audit.grid.sent}
    received = {m.metadata.message_type for m in audit.grid.received}
    assert sent == MESSAGE_TYPES and received == MESSAGE_TYPES
    assert all(m.has_content() for m in audit.grid.received), [m.error for m in audit.grid.received if m.has_error()]
    replied = {(audit.site_of(m.metadata.src_node_id), m.metadata.message_type) for m in audit.grid.received}
    for site in ("A0", "A1", "A2", "S1", "S2"):
        assert (site, "query.handshake") in replied and (site, "evaluate") in replied, site
    for site in ("A0", "A1", "S1"):
        assert (site, "query.preprocess") in replied and (site, "train") in replied, site
    assert len(audit.grid.sent) == len(audit.grid.received) > 20
    assert audit.predictions, "no site computed predictions: the prediction check would be vacuous"


# ------------------------------------------------------------------------------ rule 1
def _forbidden_strings(audit) -> list[str]:
    bag_dir = audit.data_dir / "bags"
    out = {str(audit.data_dir), str(audit.data_dir.resolve()), str(bag_dir)}
    for p in audit.cohort.patients:
        out.add(p.case_id)
        for s in p.slide_ids:
            out.update({s, str(bag_path(bag_dir, s)), bag_path(bag_dir, s).name})
    return sorted(x for x in out if x)


def test_no_identifier_or_path_in_any_message(audit):
    forbidden = _forbidden_strings(audit)
    assert len(forbidden) > 60  # case ids, slide ids, bag files
    pattern = re.compile("|".join(re.escape(f) for f in forbidden))
    checked = 0
    for direction, msg in all_messages(audit):
        leaves, keys, _ = walk(msg)
        strings = [v for _, v in leaves if isinstance(v, str)] + [k for _, k in keys]
        for text in strings:
            hit = pattern.search(text)
            assert hit is None, f"{direction} {msg.metadata.message_type}: {hit.group(0)!r} in {text[:200]!r}"
            checked += 1
    assert checked > 500


def test_packed_weights_carry_the_same_arrays_and_only_the_model_keys(audit):
    # deployed, the weights travel packed (umeml.flower.packing): the audit's arrays, and besides
    # them only a layout of the model's keys, dtypes and shapes
    from umeml.flower.packing import LAYOUT, pack, unpack

    pattern = re.compile("|".join(re.escape(f) for f in _forbidden_strings(audit)))
    checked = 0
    for direction, msg in all_messages(audit):
        if not msg.has_content() or "arrays" not in msg.content.array_records:
            continue
        record = msg.content.array_records["arrays"]
        packed = pack(record)
        layout = json.loads(packed[LAYOUT].numpy().tobytes().decode())
        assert [key for key, _, _ in layout] == list(record), direction
        assert pattern.search(packed[LAYOUT].numpy().tobytes().decode()) is None, direction
        back = unpack(packed)
        assert all(back[k].numpy().tobytes() == record[k].numpy().tobytes() for k in record), direction
        checked += 1
    assert checked > 5


# ------------------------------------------------------------------------------ rule 2
METRIC_FIELDS = r"(value|ci_low|ci_high|n|n_boot|n_boot_used|n_classes|pairs|events|error)"
PRIVACY_FIELDS = (r"(experiment|round|site|kind|status|sample_rate|noise_multiplier|steps|max_grad_norm|epsilon|"
                  r"epsilon_total|cumulative_steps|delta|accountant|target_epsilon|budget_scope|clip_groups)")
# the public description of a DP release of statistics (umeml.federation.stats_release.public_record)
RELEASE_FIELDS = (r"report\.json\.releases\[\]\.(kind|epsilon|delta|cells|cells_per_grade|mechanism|noise_multiplier|"
                  r"sample_rate|steps|clip|genes|(sensitivity|noise_std|shares)\.(count|sum|sumsq))")
REPLY_FIELDS = {
    "query.handshake": [r"report\.json\.(site|umeml_version|n_patients|feature_dim|encoder|with_pathology|with_genomics)",
                        r"report\.json\.(group_sizes|subtypes|grades|subtype_counts|grade_counts)\[\]"],
    "query.preprocess": [r"report\.json\.(site|n|suppressed|survival_hist_epsilon)",
                         r"report\.json\.(survival_hist|grade_counts|subtype_counts|genomic_count|genomic_sum|"
                         r"genomic_sumsq)\[\]", RELEASE_FIELDS],
    "train": [r"metrics\.(num-examples|train_loss)",
              r"report\.json\.(site|num-examples|train_loss|steps|seconds|empty_batches|skipped|note)",
              r"report\.json\.privacy\." + PRIVACY_FIELDS,
              # one wave per round: the validation of the received weights rides in the training reply
              r"report\.json\.validation\.(site|part|n|suppressed|loss|seconds|weights_round)",
              r"report\.json\.validation\.tasks\.\w+\.(error|n)",
              r"report\.json\.validation\.tasks\.\w+\.\w+\." + METRIC_FIELDS,
              r"report\.json\.validation\.tasks\.\w+\.confusion_matrix\.value\[\]\[\]"],
    "evaluate": [r"metrics\.num-examples", r"report\.json\.(site|part|n|suppressed|loss|seconds)",
                 r"report\.json\.tasks\.\w+\.(error|n)",
                 r"report\.json\.tasks\.\w+\.\w+\." + METRIC_FIELDS,
                 r"report\.json\.tasks\.\w+\.confusion_matrix\.value\[\]\[\]"],
    "query.personalise": [r"report\.json\.(site|n|n_train|suppressed|skipped|epochs|seconds)",
                          r"report\.json\.heads\.\w+", r"report\.json\.guard\.(inner_train|inner_val|notes\[\])",
                          r"report\.json\.(global|personalised)\.loss",
                          r"report\.json\.(global|personalised)\.tasks\.\w+\.(error|n)",
                          r"report\.json\.(global|personalised)\.tasks\.\w+\.\w+\." + METRIC_FIELDS,
                          r"report\.json\.(global|personalised)\.tasks\.\w+\.confusion_matrix\.value\[\]\[\]"],
}


def _list_lengths(value, path="", out=None):
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            _list_lengths(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        out.setdefault(path, set()).add(len(value))
        for v in value:
            _list_lengths(v, f"{path}[]", out)
    return out


def test_replies_carry_only_allowlisted_aggregates(audit):
    check_allowlisted(audit)


def check_allowlisted(audit):
    """Rule 2 over every reply of ``audit``."""
    sizes = audit.cohort.gene_groups.sizes
    n_sub, n_grade, n_genes = len(audit.cohort.subtypes), len(audit.cohort.grades), int(sum(sizes))
    allowed_lengths = {
        ".group_sizes": {len(sizes)}, ".subtypes": {n_sub}, ".grades": {n_grade},
        ".subtype_counts": {n_sub}, ".grade_counts": {n_grade}, ".survival_hist": {len(survival_grid()) - 1},
        ".genomic_count": {n_genes}, ".genomic_sum": {n_genes}, ".genomic_sumsq": {n_genes}, ".releases": {1, 2},
        ".guard.notes": {0, 1},  # personalisation: why the heads stayed global (one reason at most)
        ".tasks.grade.confusion_matrix.value": {n_grade}, ".tasks.grade.confusion_matrix.value[]": {n_grade},
        ".tasks.subtype.confusion_matrix.value": {n_sub}, ".tasks.subtype.confusion_matrix.value[]": {n_sub},
    }
    task_lengths = {k: v for k, v in allowed_lengths.items() if k.startswith(".tasks.")}
    # the validation inside a training reply (one wave per round), the personalisation reply's two evaluations
    for part in (".validation", ".global", ".personalised"):
        allowed_lengths.update({part + k: v for k, v in task_lengths.items()})
    model_shapes = None
    for msg in audit.grid.sent:  # the global model the coordinator sends
        if msg.metadata.message_type == "train":
            model_shapes = {k: a.numpy().shape for k, a in msg.content["arrays"].items()}
            break
    assert model_shapes
    for msg in audit.grid.received:
        kind = msg.metadata.message_type
        patterns = [re.compile(p + "$") for p in REPLY_FIELDS[kind]]
        leaves, _, arrays = walk(msg)
        for path, value in leaves:
            assert any(p.match(path) for p in patterns), f"{kind} reply: field {path} = {value!r} is not allowlisted"
        report = json.loads(str(msg.content["report"]["json"]))
        for path, lengths in _list_lengths(report).items():
            assert lengths <= allowed_lengths.get(path, set()), f"{kind} reply: list {path} of length {lengths}"
        assert set(msg.content.keys()) <= {"report", "metrics", "arrays", CONTROL_DELTA}
        if arrays:
            assert kind == "train"
            by_record = {}
            for k, a in arrays.items():
                name, key = k.split(".", 1)
                by_record.setdefault(name, {})[key] = a.shape
            assert by_record.pop("arrays") == model_shapes
            if CONTROL_DELTA in by_record:  # SCAFFOLD: c_i+ - c_i, shaped like the (float) weights, nothing else
                assert by_record.pop(CONTROL_DELTA) == model_shapes
            assert not by_record


# ------------------------------------------------------------------------------ rule 3
def _is_ratio(v: float, n: int) -> bool:
    if not 0.0 <= v <= 1.0:
        return False
    f = Fraction(v).limit_denominator(max(n, 1))
    return abs(float(f) - v) <= 1e-12


def _close_to_any(v: float, values: np.ndarray) -> bool:
    return bool(np.any(np.abs(values - v) <= 1e-6 * np.maximum(1.0, np.abs(values))))


COORDINATOR_SETTINGS = re.compile(r"config\.(experiment|server-round|part|n-boot|proximal-mu|lr-scale|epochs)(\.|\[|$)")


def test_no_survival_time_in_any_message(audit):
    all_times = np.array([p.survival_months for p in audit.cohort.patients])
    grid = set(survival_grid().tolist())
    replies = {}
    for m in audit.grid.received:
        if m.metadata.message_type == "query.preprocess":
            replies[audit.site_of(m.metadata.src_node_id)] = json.loads(str(m.content["report"]["json"]))
    usable = [r for r in replies.values() if not r.get("suppressed")]
    checked = 0
    for direction, msg in all_messages(audit):
        if direction == "received":
            patients = audit.patients(audit.site_of(msg.metadata.src_node_id))
            times, n = np.array([p.survival_months for p in patients]), len(patients)
        else:
            times, n = all_times, len(all_times)
        leaves, _, _ = walk(msg)
        for path, v in leaves:
            if COORDINATOR_SETTINGS.match(path) or path.endswith(".seconds"):
                continue
            if path == "config.preprocessing.survival_edges[]":
                assert v in grid, f"survival edge {v} is not a point of the public grid"
                continue
            if path.startswith("config.preprocessing.class_weights."):
                continue  # checked against the counts below
            if isinstance(v, float) and not _is_ratio(v, n):
                assert not _close_to_any(v, times), f"{direction} {msg.metadata.message_type}: {path} = {v}"
                checked += 1
    assert checked > 200
    # the class weights the coordinator sends are a function of the sites' class counts only
    prep = json.loads(str(next(m for m in audit.grid.sent if m.metadata.message_type == "train")
                           .content["config"]["preprocessing"]))
    for task in ("grade", "subtype"):
        counts = np.sum([r[f"{task}_counts"] for r in usable], axis=0)
        np.testing.assert_allclose(prep["class_weights"][task], class_weights_from_counts(counts).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------ rule 4
def test_no_per_patient_prediction_in_any_message(audit):
    values = []
    for p in audit.predictions:
        values += [np.asarray(a, np.float32).ravel() for a in p.probs.values()]
        if p.risk is not None:
            values.append(np.asarray(p.risk, np.float32).ravel())
    predicted = set(np.concatenate(values).astype(np.float64).tolist())
    assert len(predicted) > 100
    checked = 0
    for direction, msg in all_messages(audit):
        leaves, _, _ = walk(msg)
        for path, v in leaves:
            if isinstance(v, float):
                if float(v * 1024).is_integer():  # 0, 0.5, 0.75, 1...: what count ratios give
                    continue
                assert v not in predicted, f"{direction} {msg.metadata.message_type}: {path} = {v} is a prediction"
                checked += 1
    assert checked > 100


# ------------------------------------------------------------------------------ rule 5
def test_no_genomic_profile_and_moments_only_over_k_patients(audit):
    for m in audit.grid.received:
        site = audit.site_of(m.metadata.src_node_id)
        rt = audit.sites.runtimes[site]
        rows = rt.cohort.genomics[rt.indices][rt.cohort.has_genomics[rt.indices]].astype(np.float64)
        report = json.loads(str(m.content["report"]["json"]))
        for key, value in report.items():
            if isinstance(value, list) and len(value) == rows.shape[1] and value and isinstance(value[0], float):
                arr = np.asarray(value)
                for row in rows:
                    assert not np.allclose(arr, row, rtol=1e-5) and not np.allclose(arr, row ** 2, rtol=1e-5), \
                        f"site {site}: {key} is one patient's genomic profile"
        if m.metadata.message_type == "query.preprocess" and "genomic_count" in report:
            assert min(report["genomic_count"]) >= K, site
    prep = {audit.site_of(m.metadata.src_node_id): json.loads(str(m.content["report"]["json"]))
            for m in audit.grid.received if m.metadata.message_type == "query.preprocess"}
    assert "genomic_sum" in prep["A0"]  # >= k patients with genomics
    assert prep["A1"]["n"] >= K and "genomic_sum" not in prep["A1"]  # enough patients, 2 with genomics


# ------------------------------------------------------------------------------ rule 6
HANDSHAKE_BELOW_K = {"site", "umeml_version", "n_patients", "feature_dim", "encoder", "group_sizes", "subtypes",
                     "grades", "with_pathology", "with_genomics"}


def test_sites_below_k_send_only_their_count(audit):
    seen = set()
    for m in audit.grid.received:
        site = audit.site_of(m.metadata.src_node_id)
        kind = m.metadata.message_type
        report = json.loads(str(m.content["report"]["json"]))
        if kind == "query.handshake":
            if report["n_patients"] < K:
                seen.add((site, kind))
                assert set(report) == HANDSHAKE_BELOW_K, site
                assert report["with_pathology"] in (0, 1) and report["with_genomics"] in (0, 1)
            else:
                assert "subtype_counts" in report
        elif kind in ("query.preprocess", "evaluate"):
            if report["n"] < K:
                seen.add((site, kind))
                expected = {"site", "n", "suppressed"} | ({"part"} if kind == "evaluate" else set())
                assert set(report) == expected and report["suppressed"] is True, (site, kind, report)
                if "metrics" in m.content:
                    assert dict(m.content["metrics"]) == {"num-examples": report["n"]}, (site, kind)
            else:
                assert not report.get("suppressed"), (site, kind)
    assert {("S1", "query.handshake"), ("S2", "query.handshake"), ("S1", "query.preprocess"),
            ("S1", "evaluate"), ("S2", "evaluate")} <= seen
    final = json.loads((audit.run_dir / "final.json").read_text())
    assert final["held_out"]["S2"] == {"site": "S2", "part": "all", "n": 2, "suppressed": True}


# ------------------------------------------------------------------------------ rule 7
def test_survival_histogram_does_not_reveal_individual_survival_months(audit):
    m = next(m for m in audit.grid.received if m.metadata.message_type == "query.preprocess"
             and audit.site_of(m.metadata.src_node_id) == "A0")
    hist = json.loads(str(m.content["report"]["json"]))["survival_hist"]
    rt = audit.sites.runtimes["A0"]
    train, _ = rt._split(_experiment())
    times, events = rt.cohort.times_events(train)
    grid = survival_grid()
    exact, _ = np.histogram(np.clip(times[events == 1], 0, grid[-1] - 1e-9), bins=grid)
    # the site says what it noised at: "auto" without local DP is 1.0
    assert json.loads(str(m.content["report"]["json"]))["survival_hist_epsilon"] == 1.0 and len(hist) == len(exact)
    # at epsilon 1 a cell keeps its exact count with probability 0.46: about 25 of the 46 cells
    # differ; fewer than 5 has probability 1e-10
    assert sum(h != e for h, e in zip(hist, exact)) >= 5, "the histogram is (nearly) the exact one"
    months = sorted(np.floor(times[events == 1]).astype(int).tolist())
    recovered = sorted(int(grid[i]) for i, c in enumerate(hist) for _ in range(max(c, 0)))
    assert recovered != months, "the histogram gives every uncensored patient's survival month"


def test_training_site_below_k_reports_no_aggregate(audit):
    m = next(m for m in audit.grid.received if m.metadata.message_type == "train"
             and audit.site_of(m.metadata.src_node_id) == "S1")
    report = json.loads(str(m.content["report"]["json"]))
    assert "train_loss" not in report and "skipped" in report
    metrics = m.content.metric_records.get("metrics", {})
    assert "train_loss" not in metrics and "arrays" not in m.content.array_records


def test_personalisation_replies_carry_metrics_only_and_respect_k(audit):
    replies = {audit.site_of(m.metadata.src_node_id): m for m in audit.grid.received
               if m.metadata.message_type == "query.personalise"}
    assert set(replies) == {"A0", "A1", "S1"}  # the training sites, never a held-out one
    for site, m in replies.items():
        assert not m.content.array_records and "metrics" not in m.content, site
        report = json.loads(str(m.content["report"]["json"]))
        if report["n"] < K or report["n_train"] < K:
            assert set(report) == {"site", "n", "n_train", "suppressed"}, (site, report)
        else:
            assert {"global", "personalised"} <= set(report), site
    assert json.loads(str(replies["S1"].content["report"]["json"]))["suppressed"] is True
    final = json.loads((audit.run_dir / "final.json").read_text())
    assert final["selection"]["rule"] == "best_validation" and final["personalisation"]["n_sites"] == 2


# ------------------------------------------------------------------------------ partial updates
PARTIAL = {"train": {"trainable": "decoder"}, "keep_local": ["fusion.*"]}


@pytest.fixture(scope="module")
def partial_audit(tiny_cohort_dir, tmp_path_factory):
    cfg = tiny_experiment(bootstrap=0, k_min_patients=K, train=PARTIAL["train"], keep_local=PARTIAL["keep_local"])
    return run_audit(tiny_cohort_dir, tmp_path_factory.mktemp("partial") / "run", experiment=cfg)


def test_frozen_and_keep_local_weights_never_leave_a_site(partial_audit):
    sent = next(m for m in partial_audit.grid.sent if m.metadata.message_type == "train")
    model_keys = list(sent.content["arrays"].keys())
    expected = [k for k in model_keys if k.split(".")[0] in ("decoder", "norm", "heads")]
    assert expected and any(k.startswith("fusion.") for k in model_keys) and any(k.startswith("path.") for k in model_keys)
    updates = [m for m in partial_audit.grid.received if m.metadata.message_type == "train"
               and "arrays" in m.content.array_records]
    assert len(updates) == 4  # A0 and A1, two rounds
    for m in updates:
        assert list(m.content["arrays"].keys()) == expected


def test_coordinator_keeps_what_no_site_sent(partial_audit):
    from umeml.model import load

    trains = [m for m in partial_audit.grid.sent if m.metadata.message_type == "train"]
    first = {k: a.numpy() for k, a in trains[0].content["arrays"].items()}
    final, _ = load(partial_audit.run_dir / "checkpoints" / "global.pt")
    changed = set()
    for k, v in final.state_dict().items():
        if not np.array_equal(v.numpy(), first[k]):
            changed.add(k.split(".")[0])
    assert changed == {"decoder", "norm", "heads"}  # frozen encoders and the sites' own fusion unchanged


# ------------------------------------------------------------------------------ SCAFFOLD
@pytest.fixture(scope="module")
def scaffold_audit(tiny_cohort_dir, tmp_path_factory):
    """The same federation with SCAFFOLD: the control variates travel both ways."""
    cfg = tiny_experiment(bootstrap=0, k_min_patients=K, strategy="scaffold", train={"optimizer": "sgd"})
    root = tmp_path_factory.mktemp("scaffold")
    return run_audit(tiny_cohort_dir, root / "run", experiment=cfg, state_root=str(root / "sites"))


def test_scaffold_sends_only_weight_shaped_control_variates(scaffold_audit):
    sent = [m for m in scaffold_audit.grid.sent if m.metadata.message_type == "train"]
    shapes = {k: a.numpy().shape for k, a in sent[0].content["arrays"].items()}
    assert all({k: a.numpy().shape for k, a in m.content[SERVER_CONTROL].items()} == shapes for m in sent)
    got = [m for m in scaffold_audit.grid.received if CONTROL_DELTA in m.content.array_records]
    assert len(got) == 4  # A0 and A1 (S1 is below k and does not train), two rounds
    check_allowlisted(scaffold_audit)  # rule 2 with the control deltas
    test_no_identifier_or_path_in_any_message(scaffold_audit)  # rule 1 over the new records' keys


# ------------------------------------------------------------------------------ rule 8: DP statistics
@pytest.fixture(scope="module")
def dp_audit(tiny_cohort_dir, tmp_path_factory):
    """The same federation under local DP (epsilon 8): statistics privacy follows it."""
    cfg = tiny_experiment(bootstrap=0, k_min_patients=K, local_dp={"enabled": True, "target_epsilon": 8.0})
    root = tmp_path_factory.mktemp("dp")
    return run_audit(tiny_cohort_dir, root / "run", experiment=cfg, state_root=str(root / "sites"))


def _exact_statistics(rt, cfg) -> dict:
    """What a site would have sent without statistics privacy."""
    c = rt.cohort
    train, _ = rt._split(cfg)
    rows = c.genomics[train][c.has_genomics[train]].astype(np.float64)
    return {"subtype_counts": [sum(c.subtype_index(i) == k for i in train) for k in range(len(c.subtypes))],
            "grade_counts": [sum(c.grade_index(i) == g for i in train) for g in range(len(c.grades))],
            "genomic_count": [float(len(rows))] * rows.shape[1], "genomic_sum": rows.sum(axis=0),
            "genomic_sumsq": (rows ** 2).sum(axis=0)}


def test_no_exact_counts_or_moments_leave_a_dp_site(dp_audit):
    check_allowlisted(dp_audit)
    cfg = tiny_experiment(bootstrap=0, k_min_patients=K)
    checked = set()
    for m in dp_audit.grid.received:
        site, kind = dp_audit.site_of(m.metadata.src_node_id), m.metadata.message_type
        report = json.loads(str(m.content["report"]["json"]))
        if kind == "query.handshake":  # no class counts; modalities as presence flags only
            assert "subtype_counts" not in report and "grade_counts" not in report, site
            assert report["with_pathology"] in (0, 1) and report["with_genomics"] in (0, 1), site
        if kind != "query.preprocess" or report.get("suppressed"):
            continue
        exact = _exact_statistics(dp_audit.sites.runtimes[site], cfg)
        for key in ("subtype_counts", "grade_counts"):
            assert report[key] != exact[key], f"site {site}: exact {key}"
        for key in ("genomic_count", "genomic_sum", "genomic_sumsq"):  # A1 (2 patients with genomics) too
            assert not np.allclose(report[key], exact[key], rtol=1e-3), f"site {site}: exact {key}"
        assert [r["kind"] for r in report["releases"]] == ["class_counts", "genomic_moments"]
        checked.add(site)
    assert checked == {"A0", "A1"}
    ledger = json.loads((dp_audit.run_dir / "privacy.json").read_text())
    for site in ("A0", "A1"):  # the run's report lists every release per site under one total
        kinds = [r["kind"] for r in ledger["final"]["total"][site]["releases"]]
        assert kinds == ["dp_sgd", "survival_histogram", "class_counts", "genomic_moments"], site

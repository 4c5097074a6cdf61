"""One wave per round: training sites validate the weights they receive and train in one reply,
held-out sites evaluate in the same wave, a final evaluation wave follows the last round; every
evaluation is recorded with the round of the global weights it scored."""

from __future__ import annotations

import pytest
import torch

from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.source import CohortSource
from umeml.server.coordinator import Coordinator

from fed_helpers import LocalGrid, tiny_experiment

SITES = ("A0", "A1", "A2")


class WaveGrid(LocalGrid):
    """A LocalGrid that records the message types of every send_and_receive call (one wave)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waves: list[list[tuple[str, int, object]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.waves.append([(m.metadata.message_type, m.metadata.dst_node_id,
                            m.content["config"].get("server-round")) for m in messages])
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture(scope="module")
def app(tiny_cohort_dir):
    return build_client_app(SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir))))


def _run(app, path, rounds, **fed):
    grid = WaveGrid(app, len(SITES))
    cfg = tiny_experiment(rounds=rounds, bootstrap=10, survival_hist_epsilon=None, **fed)
    Coordinator(cfg, path, expected_sites=len(SITES), held_out=("A2",), wait_timeout=5,
                printer=lambda s: None).run(grid)
    return grid, torch.load(path / "resume.pt", weights_only=True)["history"]


def test_one_wave_per_round_and_a_final_evaluation_wave(app, tmp_path):
    grid, hist = _run(app, tmp_path / "run", 3)
    rounds = [w for w in grid.waves if not w[0][0].startswith("query")]
    assert len(rounds) == 4  # three training waves and the final evaluation wave
    held = 103
    assert sorted(rounds[0]) == [("train", 101, 1), ("train", 102, 1)]
    for r in (2, 3):  # training on round r-1's weights, the held-out site scoring them in the same wave
        assert sorted(rounds[r - 1]) == [("evaluate", held, r - 1), ("train", 101, r), ("train", 102, r)]
    assert sorted(rounds[3]) == [("evaluate", 101, 3), ("evaluate", 102, 3), ("evaluate", held, 3)]
    for e in hist:  # every record says which weights it scored and which wave carried it
        ev = e["evaluation"]
        assert ev["weights_round"] == e["round"] and set(ev["validation"]) == {"A0", "A1"}
        assert set(ev["held_out"]) == {"A2"} and ev["wave"] == (e["round"] + 1 if e["round"] < 3 else "final")
        assert all("validation" not in t for t in e["train"])
        assert len(e["wave_compute_seconds"]) == (2 if e["round"] == 3 else 1)


def test_validation_in_the_next_wave_scores_the_same_weights_as_a_final_wave(app, tmp_path):
    # round 1's weights are scored inside round 2's training replies in a 2-round run, and by the
    # final evaluation wave in a 1-round run: the same weights, the same numbers
    _, two = _run(app, tmp_path / "two", 2, k_min_patients=3)  # k = 3: the 4-patient validation splits report
    _, one = _run(app, tmp_path / "one", 1, k_min_patients=3)
    for kind, site in (("validation", "A0"), ("validation", "A1"), ("held_out", "A2")):
        a, b = two[0]["evaluation"][kind][site], one[0]["evaluation"][kind][site]
        assert a["n"] == b["n"] and a.get("suppressed") == b.get("suppressed"), (kind, site)
        if not b.get("suppressed"):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (kind, site)
    assert all("loss" in r for r in two[0]["evaluation"]["validation"].values())  # compared by value
    assert two[0]["evaluation"]["wave"] == 2 and one[0]["evaluation"]["wave"] == "final"


def test_evaluate_every_skips_waves_but_the_last_round_is_evaluated(app, tmp_path):
    grid, hist = _run(app, tmp_path / "run", 3, evaluate_every=2)
    assert [bool(e["evaluation"]) for e in hist] == [False, True, True]
    rounds = [w for w in grid.waves if not w[0][0].startswith("query")]
    assert [sorted({k for k, _, _ in w}) for w in rounds] == [["train"], ["train"], ["evaluate", "train"], ["evaluate"]]

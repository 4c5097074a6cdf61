"""Issue 17: under local DP (epsilon 8, the recipe), a federation that starts from a public
checkpoint and fine-tunes the heads beats one that trains UMEML from scratch, on the held-out
site of a small synthetic world (sites P0/P1 public, A0-A2 private, H held out)."""

import dataclasses

import pytest

from umeml.config import config_from_dict
from umeml.data.cohort import load_data_dir
from umeml.data.source import CohortSource
from umeml.data.splits import make_split
from umeml.data.synth import SynthSpec, generate
from umeml.train.central import train_central

from fed_helpers import LocalGrid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
PUBLIC, PRIVATE, HELD = ("A4", "A5"), ("A0", "A1", "A2"), ("A3",)
# measured first (this test, seed 0, seeded noise, so the run is deterministic): grade auc_macro
# public + heads 0.652 against 0.613 from scratch on this tiny world (16-dim features, 40
# patients a site); the bench's demo-sized world shows a far larger gap (docs/benchmarks.md).
# Since the epsilon 8 also covers the preprocessing releases (less budget for DP-SGD, Gaussian DP
# class counts, the public checkpoint's genomic scale): 0.648 against 0.584 (0.611 with DP genomic
# moments instead of the checkpoint's scale). Since the federation takes the checkpoint's survival
# bins too (federation.preprocessing_source auto; no survival histogram released, so more budget
# for DP-SGD): 0.651 against 0.584 (0.584 also with the public sites' class weights, so the
# class weights stay the private sites')
MARGIN = 0.02


def _cfg(**train):
    return config_from_dict({
        "name": "pubinit", "seed": 0, "data": {"max_patches": 32},
        "split": {"test_sites": list(HELD)},
        "model": {"hidden_dim": 16, "n_prototypes": 3, "n_registers": 2, "dropout": 0.0, "drop_path": 0.0},
        "train": {"epochs": 6, "batch_size": 8, "lr": 0.003, "bootstrap": 0, **train},
        "federation": {"rounds": 6, "train_sites": list(PRIVATE), "evaluate_every": 6, "min_train_sites": 2,
                       "local_dp": {"enabled": True, "target_epsilon": 8.0}},
    })


def _grade_auc(cfg, cohort, source, run_dir):
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.server.coordinator import Coordinator

    sites = tuple(sorted(PRIVATE + HELD))
    app = build_client_app(SimulatedSites(sites, source, "cpu", state_root=str(run_dir / "sites")))
    final = Coordinator(cfg, run_dir, expected_sites=len(sites), held_out=HELD, wait_timeout=5,
                        printer=lambda s: None).run(LocalGrid(app, len(sites)))
    return final["held_out"][HELD[0]]["tasks"]["grade"]["auc_macro"]["value"]


def test_dp_from_a_public_checkpoint_beats_dp_from_scratch(tmp_path):
    data = tmp_path / "synth"
    generate(SynthSpec(sites=6, patients=40, seed=0, feature_dim=16, median_patches=40, max_patches=80), data)
    cfg = _cfg()
    cohort, source = load_data_dir(data, cfg.data), CohortSource(data_dir=str(data))
    public = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, train_sites=PUBLIC))
    train_central(public, cohort, tmp_path / "public", split=make_split(cohort, HELD, 1, 0.2, 0, PUBLIC),
                  progress=False)
    tuned = _cfg(trainable="heads")
    tuned = dataclasses.replace(tuned, federation=dataclasses.replace(
        tuned.federation, init_checkpoint=str(tmp_path / "public" / "checkpoints" / "best.pt")))
    from_public = _grade_auc(tuned, cohort, source, tmp_path / "tuned")
    scratch = _grade_auc(cfg, cohort, source, tmp_path / "scratch")
    print(f"grade auc_macro: public + heads {from_public:.3f}, scratch {scratch:.3f}")
    assert from_public > scratch + MARGIN

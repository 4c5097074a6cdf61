"""Shared fixtures: the real TCGA data (skipped, saying why, only when ../shared is absent) and
a tiny synthetic cohort generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from umeml.data.synth import SynthSpec, generate

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "tcga_gbmlgg"


@pytest.fixture(scope="session")
def tcga_dir() -> Path:
    """Folder of the real TCGA GBM-LGG table and signatures."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real TCGA data not present at {SHARED_DATA} (../shared is absent on this machine)")
    return SHARED_DATA


TINY_SPEC = SynthSpec(sites=3, patients=20, seed=7, feature_dim=16, median_patches=40, min_patches=4, max_patches=200)


@pytest.fixture(scope="session")
def tiny_cohort_dir(tmp_path_factory) -> Path:
    """A tiny synthetic cohort (3 sites x 20 patients, 16-dim features); treat it as read-only."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(TINY_SPEC, out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Shared fixtures: the real TCGA data (skipped, saying why, only when ../shared is absent) and
a tiny synthetic cohort generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models on 2 shared cores: torch's default of one intra-op thread per core made every
# forward/backward contend (train_central's learning test: 43 s with 2 threads, 8 s with 1, on a
# busy machine). Set before torch is imported, so subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_for_the_session():
    """Every test runs with one torch intra-op thread (see OMP_NUM_THREADS above): torch may
    have been imported before this file by a plugin, so set it explicitly as well."""
    import torch

    torch.set_num_threads(1)
    yield

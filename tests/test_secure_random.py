"""A site's DP-SGD randomness comes from the OS's CSPRNG, never from a torch generator.

torch's generators keep 32 bits of a seed: a site that seeded its noise from ``secrets.randbits``
through one drew noise an adversary could reproduce by trying 2^32 seeds. These tests pin that
the secure path takes nothing from a seed or a torch generator, and that its draws have the
distributions Opacus's would (the fused optimizer's variance test covers the noise's scale).
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
from scipy import stats

from umeml.config import DataConfig, ModelConfig
from umeml.data.cohort import load_data_dir
from umeml.data.dataset import CohortDataset
from umeml.data.labels import survival_bin_edges
from umeml.model import build_model
from umeml.train.dp import DPSGD, poisson_loader, train_dp_steps
from umeml.train.loop import LossSettings
from umeml.train.secure_random import OSPoissonSampler, os_gaussian_like, os_standard_normal, os_uniform

HEADS = {"grade": 3, "subtype": 6, "survival": 4}


def test_uniforms_lie_inside_the_unit_interval_and_are_uniform():
    u = os_uniform(200_000).numpy()
    assert u.dtype == np.float64 and u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-6
    assert len(np.unique(u)) == len(u)  # 53 bits: no repeats at this size


def test_standard_normals_are_standard_normal_and_odd_counts_work():
    z = os_standard_normal(200_001).numpy()
    assert len(z) == 200_001
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(np.corrcoef(z[:100_000], z[100_000:200_000])[0, 1]) < 5 / np.sqrt(100_000)  # cos vs sin halves


def test_gaussian_like_takes_the_reference_shape_dtype_and_scale():
    ref = torch.zeros(3, 50_000, dtype=torch.float32)
    x = os_gaussian_like(ref, 2.5)
    assert x.shape == ref.shape and x.dtype == torch.float32
    lo, hi = stats.chi2.ppf(1e-6 / 2, x.numel()) / x.numel(), stats.chi2.ppf(1 - 1e-6 / 2, x.numel()) / x.numel()
    assert lo < float((x.double() / 2.5).pow(2).mean()) < hi
    assert torch.equal(os_gaussian_like(ref, 0.0), ref)


def test_poisson_sampler_includes_each_patient_with_the_sample_rate():
    sampler = OSPoissonSampler(40, 0.1, 3000)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 3000
    counts = np.bincount(np.concatenate([np.asarray(b, dtype=int) for b in batches]), minlength=40)
    # each patient's count is Binomial(3000, 0.1): mean 300, sd ~16.4
    assert np.all(np.abs(counts - 300) < 6 * 16.5), counts
    sizes = np.array([len(b) for b in batches])
    assert (sizes == 0).sum() > 0  # empty batches happen (0.9^40 ~ 1.5%) and are kept
    with pytest.raises(ValueError, match="sample_rate"):
        OSPoissonSampler(10, 0.0, 1)


def _dataset(tiny_cohort_dir):
    cohort = load_data_dir(tiny_cohort_dir, DataConfig())
    idx = np.arange(20)
    edges = survival_bin_edges(*cohort.times_events(idx), 4)
    return cohort, CohortDataset(cohort, idx, edges, None, max_patches=16, train=True, seed=0)


def _weights_after_secure_steps(cohort, ds) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="linear"), cohort.feature_dim, cohort.gene_groups.sizes, HEADS)
    train_dp_steps(model, ds, torch.optim.SGD(model.parameters(), lr=0.1), LossSettings(("grade", "survival")),
                   torch.device("cpu"), sample_rate=0.3, noise_multiplier=1.0, max_grad_norm=1.0, steps=3, steps_per_epoch=3)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_sites_noise_is_not_a_function_of_any_seed(tiny_cohort_dir, monkeypatch):
    # an adversary who could enumerate the site's seed: before, secrets.randbits fed a torch
    # generator (32 bits kept), and a fixed draw of it reproduced the site's noise and batches
    cohort, ds = _dataset(tiny_cohort_dir)
    monkeypatch.setattr(secrets, "randbits", lambda k: 12345)
    torch.manual_seed(0)
    first, second = _weights_after_secure_steps(cohort, ds), _weights_after_secure_steps(cohort, ds)
    assert not torch.allclose(first, second)


def test_secure_mode_refuses_opacus_stock_optimizer_without_a_generator():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="fused"):
        DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 4.0, secure_mode=True, fused=False)


def test_poisson_loader_without_a_generator_samples_from_the_os(tiny_cohort_dir):
    _, ds = _dataset(tiny_cohort_dir)
    a = [len(b) for b in poisson_loader(ds, 0.5, 30, None)]
    b = [len(b) for b in poisson_loader(ds, 0.5, 30, None)]
    assert len(a) == 30 and a != b  # two loaders, two independent draws (equal with probability ~1e-20)
    seeded = [[len(x) for x in poisson_loader(ds, 0.5, 5, torch.Generator().manual_seed(1))] for _ in range(2)]
    assert seeded[0] == seeded[1]

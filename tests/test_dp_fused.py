"""The fused DP optimizer gives Opacus's clipped sums and Opacus's noise distribution.

``FusedDPOptimizer`` overrides Opacus internals, so the Opacus minor version is pinned here: a
new Opacus must be re-checked against this file before the pin moves.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import opacus
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats

from umeml.config import ModelConfig
from umeml.data.batch import PatientItem, collate
from umeml.model import available_models, build_model, register_dp_grad_samplers
from umeml.train.dp import DPSGD, train_dp_steps
from umeml.train.dp_optimizer import FusedDPOptimizer
from umeml.train.loop import LossSettings, batch_loss

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

D, GROUPS, HEADS = 6, (2, 3), {"grade": 3, "survival": 4}
LOSS = LossSettings(("grade", "survival"))
CPU = torch.device("cpu")


def test_opacus_version_is_the_one_the_fused_optimizer_was_checked_against():
    assert opacus.__version__.split(".")[:2] == ["1", "6"], (
        f"opacus {opacus.__version__}: FusedDPOptimizer overrides Opacus 1.6 internals "
        "(see umeml/train/dp_optimizer.py); re-check them and this file, then move the pin")


def make_model(name: str = "umeml") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_dim=16, n_prototypes=3, n_registers=2, dropout=0.0, drop_path=0.0)
    return build_model(cfg, D, GROUPS, HEADS)


def items(n: int, seed: int = 0) -> list[PatientItem]:
    rng = np.random.default_rng(seed)
    return [PatientItem(rng.normal(size=(int(rng.integers(1, 7)), D)).astype(np.float32),
                        rng.normal(size=sum(GROUPS)).astype(np.float32) if i % 4 else None,
                        int(rng.integers(3)), -1, int(rng.integers(4)), 12.0, int(i % 2)) for i in range(n)]


def grads_after(model, batches, fused: bool, *, noise=0.0, clip=1.0, ebs=4.0, seed=0, secure=False):
    """The privatised gradients of one DPSGD step per batch (each a list of tensors)."""
    model = copy.deepcopy(model)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.0), noise, clip, ebs,  # lr 0: weights stay put
               generator=torch.Generator().manual_seed(seed), secure_mode=secure, fused=fused)
    out = []
    try:
        for batch in batches:
            dp.step(batch, LOSS, CPU, lambda params: out.append([p.grad.detach().clone() for p in params]))
        factors = getattr(dp.optimizer, "last_clip_factors", None)
    finally:
        dp.close()
    return out, factors


@pytest.mark.parametrize("name", available_models())
def test_clipped_sums_equal_opacus_without_noise(name):
    model = make_model(name)
    batch = collate(items(7), D, sum(GROUPS))
    _, factors = grads_after(model, [batch], fused=True, clip=1e-9)  # every sample clipped
    median = float((1e-9 / factors - 1e-6).median())  # the per-sample norms, back from the factors
    for clip in (1e-3, median, 1e3):
        ours, factors = grads_after(model, [batch], fused=True, clip=clip)
        ref, _ = grads_after(model, [batch], fused=False, clip=clip)
        for a, b in zip(ours[0], ref[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (factors == 1).all() and 0 < median
    _, factors = grads_after(model, [batch], fused=True, clip=median)
    assert (factors < 1).any() and (factors == 1).any()  # the median clips some samples, not all
    # each patient's clipped gradient on its own (a batch of one is that patient's clipped gradient)
    singles = [collate([it], D, sum(GROUPS)) for it in items(7)]
    ours, _ = grads_after(model, singles, fused=True, clip=median, ebs=1.0)
    ref, _ = grads_after(model, singles, fused=False, clip=median, ebs=1.0)
    for i in range(len(singles)):
        for a, b in zip(ours[i], ref[i]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"patient {i}: {m}")


def _wrapped(model, cls):
    register_dp_grad_samplers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
        opt = cls(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.1,
                  expected_batch_size=3.0, loss_reduction="mean")
    return gsm, opt


def _virtual_and_accumulated(model, cls) -> list[torch.Tensor]:
    """A virtual batch (a skipped step, then the real one), then two backward passes per step."""
    gsm, opt = _wrapped(model, cls)
    a, b, c = (collate(items(3, seed=s), D, sum(GROUPS)) for s in (1, 2, 3))
    batch_loss(gsm, a, LOSS).mean().backward()
    opt.signal_skip_step(True)
    assert opt.step() is None  # clipped and accumulated, no noise, no step
    opt.zero_grad()
    batch_loss(gsm, b, LOSS).mean().backward()
    opt.step()
    first = [p.grad.detach().clone() for p in opt.params]
    opt.zero_grad()
    batch_loss(gsm, b, LOSS).mean().backward()
    batch_loss(gsm, c, LOSS).mean().backward()
    assert opt.accumulated_iterations == 2
    opt.step()
    second = [p.grad.detach().clone() for p in opt.params]
    gsm._close()
    return first + second


def test_skipped_steps_and_accumulated_iterations_as_opacus():
    model = make_model("umeml")
    for a, b in zip(_virtual_and_accumulated(model, FusedDPOptimizer), _virtual_and_accumulated(model, DPOptimizer)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_reusing_gradients_without_zero_grad_is_refused_as_by_opacus():
    gsm, opt = _wrapped(make_model("linear"), FusedDPOptimizer)
    batch_loss(gsm, collate(items(3), D, sum(GROUPS)), LOSS).mean().backward()
    opt.step()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.step()
    gsm._close()


def _noise(fused: bool, secure: bool, steps: int, seed: int) -> np.ndarray:
    """Flat gradients of ``steps`` noise-only (empty-batch) steps: pure N(0, 1) per coordinate."""
    empty = [collate([], D, sum(GROUPS))] * steps
    out, _ = grads_after(make_model("umeml"), empty, fused, noise=2.0, clip=0.5, ebs=1.0, seed=seed, secure=secure)
    return np.stack([torch.cat([g.reshape(-1) for g in step]).double().numpy() for step in out])


def variance_bounds(n: int, alpha: float = 1e-6) -> tuple[float, float]:
    """Two-sided chi-square interval of the sample variance of n N(0, 1) draws (known mean)."""
    return stats.chi2.ppf(alpha / 2, n) / n, stats.chi2.ppf(1 - alpha / 2, n) / n


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_noise_has_opacus_variance(secure):
    steps = 12
    ours, ref = _noise(True, secure, steps, seed=3), _noise(False, secure, steps, seed=4)
    n = ours.size
    lo, hi = variance_bounds(n)
    assert 0.81 < lo < 1 < hi < 1.21  # a std off by 10% (variance x0.81 or x1.21) falls outside
    for x in (ours, ref):
        var = float((x ** 2).mean())  # the mean is known to be 0
        assert lo < var < hi, (secure, var, lo, hi)
        assert abs(x.mean()) < 5 / np.sqrt(n)
        assert abs(stats.kurtosis(x.reshape(-1))) < 5 * np.sqrt(24 / n)  # Gaussian tails
    ratio = float((ours ** 2).mean() / (ref ** 2).mean())
    f_lo, f_hi = stats.f.ppf(1e-6 / 2, n, n), stats.f.ppf(1 - 1e-6 / 2, n, n)
    assert f_lo < ratio < f_hi and 0.81 < f_lo and f_hi < 1.21, (ratio, f_lo, f_hi)
    # every coordinate fresh: no correlation between steps, nor between the two halves of a step
    half = ours.shape[1] // 2
    assert abs(np.corrcoef(ours[0], ours[1])[0, 1]) < 5 / np.sqrt(ours.shape[1])
    assert abs(np.corrcoef(ours[:, :half].reshape(-1), ours[:, half:2 * half].reshape(-1))[0, 1]) < 5 / np.sqrt(n / 2)


def test_seeded_noise_is_reproducible_and_the_seed_matters():
    a, b, c = _noise(True, False, 2, seed=5), _noise(True, False, 2, seed=5), _noise(True, False, 2, seed=6)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_train_dp_steps_fused_equals_stock_without_noise(tiny_cohort_dir):
    from umeml.config import DataConfig
    from umeml.data.cohort import load_data_dir
    from umeml.data.dataset import CohortDataset
    from umeml.data.labels import survival_bin_edges

    cohort = load_data_dir(tiny_cohort_dir, DataConfig())
    idx = np.arange(20)
    edges = survival_bin_edges(*cohort.times_events(idx), 4)
    ds = CohortDataset(cohort, idx, edges, None, max_patches=16, train=True, seed=0)
    model = build_model(ModelConfig(hidden_dim=16, n_prototypes=3, n_registers=2, dropout=0.0, drop_path=0.0),
                        cohort.feature_dim, cohort.gene_groups.sizes, HEADS)
    weights = {}
    for fused in (True, False):
        m = copy.deepcopy(model)
        stats_ = train_dp_steps(m, ds, torch.optim.SGD(m.parameters(), lr=0.5), LOSS, CPU, sample_rate=0.25,
                                noise_multiplier=0.0, max_grad_norm=0.5, steps=4, steps_per_epoch=2, seed=1,
                                fused=fused)
        assert stats_["steps"] == 4
        weights[fused] = m.state_dict()
    assert any(not torch.equal(weights[True][k], model.state_dict()[k]) for k in weights[True])
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-5, rtol=1e-4)


class _MixedDtypes(torch.nn.Module):
    """Two linear maps, one in float64: no single flat buffer holds both."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        return self.a(x) + self.b(x.double()).float()


def test_mixed_dtypes_fall_back_to_opacus_per_tensor_code():
    torch.manual_seed(0)
    model, x = _MixedDtypes(), torch.randn(5, 3)
    grads = {}
    for cls in (FusedDPOptimizer, DPOptimizer):
        gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
        opt = cls(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.5,
                  expected_batch_size=5.0)
        gsm(x).pow(2).sum(1).mean().backward()
        opt.step()
        grads[cls] = [p.grad.clone() for p in opt.params]
        gsm._close()
    for a, b in zip(grads[FusedDPOptimizer], grads[DPOptimizer]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)

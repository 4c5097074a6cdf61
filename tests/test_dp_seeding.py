"""Seeded DP-SGD (simulations, tests): every bit of the seed matters.

torch's CPU generator keeps only the low 32 bits of a seed. Simulated sites seed DP-SGD with
``experiment seed << 32 | crc32(site)`` (+ round), so before :func:`umeml.train.dp.torch_seed`
every experiment seed of a benchmark drew the same Poisson batches and the same noise: the
seed-to-seed spread of the DP rows measured one noise draw, not the noise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_dp_fused import CPU, GROUPS, LOSS, D, items, make_model

from client.app import simulation_noise_seed
from umeml.data.batch import collate
from umeml.federation.site import local_training_seed
from umeml.train.dp import DPSGD, NOISE_STREAM, SAMPLING_STREAM, torch_seed, train_dp_steps
from umeml.train.loop import make_optimizer

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


def test_seeds_that_differ_above_bit_31_give_different_generators():
    a, b = (1 << 32) | 12345, (2 << 32) | 12345
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(a)),
                       torch.randn(4, generator=torch.Generator().manual_seed(b)))  # why torch_seed exists
    assert torch_seed(a) != torch_seed(b) and 0 <= torch_seed(a) < 2 ** 32
    assert torch_seed(a, SAMPLING_STREAM) != torch_seed(a, NOISE_STREAM)
    assert torch_seed(a + 1, SAMPLING_STREAM) != torch_seed(a, NOISE_STREAM)  # next round's batches, this noise
    assert torch_seed(a) == torch_seed(a)
    assert local_training_seed(0, "A0", 1) % 2 ** 32 != local_training_seed(1, "A0", 1) % 2 ** 32


class _Items(torch.utils.data.Dataset):
    """A dataset of the fused tests' patients with their collate."""

    def __init__(self, n):
        self.items = items(n, seed=8)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, batch):
        return collate(batch, D, sum(GROUPS))


def _weights(seed: int) -> dict[str, torch.Tensor]:
    model = make_model("linear")
    from umeml.config import TrainConfig

    stats = train_dp_steps(model, _Items(12), make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.5)), LOSS, CPU,
                           sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, steps=3, steps_per_epoch=2,
                           seed=seed)
    return {**{k: v.detach().clone() for k, v in model.state_dict().items()},
            "_sizes": torch.tensor(stats["batch_sizes"])}


def test_simulated_experiment_seeds_draw_different_batches_and_noise():
    one, two = (simulation_noise_seed(s, "A0") + 1 for s in (1, 2))  # round 1 of two experiment seeds
    assert one % 2 ** 32 == two % 2 ** 32  # they differ only above bit 31
    a, a_again, b = _weights(one), _weights(one), _weights(two)
    assert all(torch.equal(a[k], a_again[k]) for k in a)  # reproducible
    assert not all(torch.equal(a[k], b[k]) for k in a if k != "_sizes")


def test_noise_of_two_experiment_seeds_is_independent():
    """Empty batches (noise only) of two experiment seeds: uncorrelated draws."""
    draws = []
    for s in (1, 2):
        model = copy.deepcopy(make_model("umeml"))
        seed = torch_seed(simulation_noise_seed(s, "A0") + 1, NOISE_STREAM)
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.0), 1.0, 1.0, 1.0,
                   generator=torch.Generator().manual_seed(seed), secure_mode=False)
        dp.step(collate([], D, sum(GROUPS)), LOSS, CPU,
                lambda ps: draws.append(torch.cat([p.grad.reshape(-1) for p in ps]).double().numpy()))
        dp.close()
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 5 / np.sqrt(draws[0].size)

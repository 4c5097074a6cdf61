"""A real site's DP-SGD randomness (Poisson sampling and Gaussian noise) from the OS's CSPRNG.

Rules:
- torch's generators are mt19937, seeded with 32 bits (``manual_seed`` keeps the low 32 bits of
  its argument) and predictable from their outputs. Noise drawn from one is removable by whoever
  can try the 2^32 seeds (an adversary who knows every patient of a batch but one), and Opacus's
  ``secure_mode`` assumes a cryptographically secure generator (torchcsprng) it does not check.
  So a site (``seed`` None in :func:`umeml.train.dp.train_dp_steps`) never draws its DP
  randomness from a torch generator: every uniform comes from ``os.urandom``.
- Uniforms come from a ChaCha20 keystream under a fresh 256-bit key from ``os.urandom`` per draw
  (a stream cipher's keystream under a secret random key is a CSPRNG; the kernel's getrandom is
  built the same way) and have 53 random bits, offset by half a unit so they lie strictly inside
  (0, 1) (the Box-Muller logarithm never sees 0).
- Gaussian noise keeps Opacus's secure construction against floating-point attacks (Holohan and
  Braghin 2021, section 5.1; Opacus's ``_generate_noise``): the sum of four N(0, std^2) draws,
  halved, which is N(0, std^2). Each draw is Box-Muller on two uniforms, in float64, then cast.
- Poisson sampling keeps Opacus's rule: a patient is in a step's batch iff its uniform is below
  the sample rate, independently per patient and step (the batch may be empty).
- Tests (and simulations) pass a seed instead and get torch generators: reproducible, not secure.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_UNIT = 2.0 ** -53


def os_uniform(n: int) -> torch.Tensor:
    """``n`` float64 uniforms strictly inside (0, 1), 53 random bits each: a ChaCha20 keystream
    under a fresh 256-bit key and nonce from ``os.urandom`` (the construction of the kernel's
    own CSPRNG; a few times faster than reading that many bytes from ``os.urandom``)."""
    n = int(n)
    if n <= 0:
        return torch.zeros(0, dtype=torch.float64)
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
    words = torch.frombuffer(bytearray(cipher.update(bytes(8 * n))), dtype=torch.int64)
    return ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(_UNIT)


def os_standard_normal(n: int) -> torch.Tensor:
    """``n`` float64 N(0, 1) draws by Box-Muller on :func:`os_uniform` (two per pair)."""
    pairs = (int(n) + 1) // 2
    u = os_uniform(2 * pairs)
    radius = torch.log(u[:pairs]).mul_(-2.0).sqrt_()
    angle = u[pairs:].mul(2.0 * math.pi)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def os_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``reference`` (its dtype and device), by Opacus's secure
    construction (the sum of four draws, halved) on :func:`os_standard_normal`."""
    n = reference.numel()
    if std == 0 or n == 0:
        return torch.zeros_like(reference)
    draws = os_standard_normal(4 * n).view(4, n).sum(dim=0).mul_(0.5 * float(std))
    return draws.to(device=reference.device, dtype=reference.dtype).reshape(reference.shape)


class OSPoissonSampler:
    """Opacus's ``UniformWithReplacementSampler`` (``steps`` batches, each patient in a batch
    with probability ``sample_rate``, independently) with its uniforms from :func:`os_uniform`;
    a batch sampler for ``torch.utils.data.DataLoader``."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int):
        if num_samples < 1 or not 0 < sample_rate <= 1 or steps < 0:
            raise ValueError(f"Poisson sampler: num_samples {num_samples} >= 1, 0 < sample_rate {sample_rate} <= 1, "
                             f"steps {steps} >= 0")
        self.num_samples, self.sample_rate, self.steps = int(num_samples), float(sample_rate), int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield torch.nonzero(os_uniform(self.num_samples) < self.sample_rate).flatten().tolist()

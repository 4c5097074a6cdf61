"""Opacus's ``DPOptimizer`` with clipping and noise fused over all trainable tensors.

Opacus clips and noises parameter by parameter: per tensor a norm, an einsum, a noise draw, an
add and a division (and ``scale_grad`` recomputes ``accumulated_iterations``, itself a loop over
every parameter, once per parameter). A UMEML model has about 120 tensors, so a step is several
hundred small kernel launches and Python round trips. :class:`FusedDPOptimizer` does the same
arithmetic on one flat buffer:

- the per-sample gradients are concatenated into one (B, N) matrix; per-sample norms are one
  row norm of it (the norm of the per-parameter norms, as Opacus takes, is the same number up to
  rounding); clipping factors ``min(1, C / (norm + 1e-6))`` exactly as Opacus; the clipped sum
  is one matrix-vector product;
- the noise is ONE call of Opacus's own ``_generate_noise`` on the flat (N,) buffer, with the
  same standard deviation ``noise_multiplier * max_grad_norm``, the same generator and the same
  ``secure_mode`` construction (secure: a discarded draw, then the sum of four draws halved; else
  one seeded draw). Every coordinate gets independent N(0, std^2) noise, as with Opacus; only the
  order in which the generator's numbers land on the coordinates differs;
- ``p.summed_grad`` and ``p.grad`` are views of the flat buffers, so the wrapped optimizer,
  FedProx's gradient edit and Opacus's processed-flag checks see ordinary per-parameter tensors.

Everything else is Opacus's: ``pre_step`` (empty-trainable-set case, ``_check_skip_next_step``,
the step hook), skipped steps accumulating into ``summed_grad`` (virtual batches), accumulated
iterations (several backward passes before a step), the empty batch (zero clipped sum, noise
only), ``zero_grad``. Parameters of mixed dtype or device fall back to Opacus's per-tensor code.

Relies on these Opacus 1.6 internals (``tests/test_dp_fused.py`` pins the version and checks the
result against the stock optimizer): ``DPOptimizer._get_flat_grad_sample``, the ``summed_grad``
attribute, ``pre_step`` calling ``clip_and_accumulate`` / ``add_noise`` / ``scale_grad`` in that
order, and ``opacus.optimizers.optimizer._generate_noise``, ``_mark_as_processed``,
``_check_processed_flag``.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)
from torch import nn

__all__ = ["FusedDPOptimizer"]


def _split_like(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views of the flat (N,) ``flat`` shaped like each parameter, in order."""
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]


class FusedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose clip, accumulate, noise and scale run once on flat buffers.

    Same constructor and semantics as :class:`opacus.optimizers.DPOptimizer`; see the module
    docstring for what is fused and what stays Opacus's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._summed_flat: torch.Tensor | None = None  # what the p.summed_grad views point into
        self._grad_flat: torch.Tensor | None = None  # what the p.grad views point into
        self._views_summed_grad: list[torch.Tensor] = []
        self._views_grad: list[torch.Tensor] = []
        self.last_clip_factors: torch.Tensor | None = None  # (B,) of the last clipped batch

    def _fusable(self, params: list[nn.Parameter]) -> bool:
        # one flat buffer needs one dtype and one device
        return len({(p.dtype, p.device) for p in params}) == 1

    def _owns(self, attr: str, flat: torch.Tensor | None, params: list[nn.Parameter]) -> bool:
        """True when every ``p.<attr>`` is still the view of ``flat`` this optimizer set."""
        if flat is None:
            return False
        views = getattr(self, "_views_" + attr)
        return len(views) == len(params) and all(getattr(p, attr) is v for p, v in zip(params, views))

    def clip_and_accumulate(self) -> None:
        """Clip every sample's gradient over all tensors at once; add the sum to ``summed_grad``."""
        params = self.params
        if not self._fusable(params):
            self._summed_flat = None
            return super().clip_and_accumulate()
        for p in params:
            _check_processed_flag(p.grad_sample)
        samples = [self._get_flat_grad_sample(p) for p in params]
        n, dtype = len(samples[0]), params[0].dtype
        flat = torch.cat([g.reshape(n, p.numel()).to(dtype) for g, p in zip(samples, params)], dim=1)
        if n == 0:  # empty batch: nothing to clip, the clipped sum is zero
            factors = flat.new_zeros(0)
        else:
            norms = torch.linalg.vector_norm(flat, dim=1)
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = factors @ flat
        previous = [p.summed_grad for p in params]
        if any(s is not None for s in previous):  # a skipped step left its clipped sum
            summed += torch.cat([(s if s is not None else p.new_zeros(p.shape)).reshape(-1)
                                 for s, p in zip(previous, params)])
        self.last_clip_factors = factors
        self._summed_flat = summed
        self._views_summed_grad = _split_like(summed, params)
        for p, v in zip(params, self._views_summed_grad):
            p.summed_grad = v
        for p in params:
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """One Gaussian draw over the flat clipped sum (Opacus's generator); ``p.grad`` = views."""
        params = self.params
        if not self._owns("summed_grad", self._summed_flat, params):
            self._grad_flat = None
            return super().add_noise()
        _check_processed_flag([p.summed_grad for p in params])
        noise = _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=self._summed_flat,
                                generator=self.generator, secure_mode=self.secure_mode)
        self._grad_flat = self._summed_flat + noise
        self._views_grad = _split_like(self._grad_flat, params)
        for p, v in zip(params, self._views_grad):
            p.grad = v
        _mark_as_processed([p.summed_grad for p in params])

    def scale_grad(self) -> None:
        """Divide by expected batch size x accumulated iterations once, on the flat gradient."""
        params = self.params
        if self.loss_reduction != "mean" or not self._owns("grad", self._grad_flat, params):
            return super().scale_grad()
        self._grad_flat /= self.expected_batch_size * self.accumulated_iterations

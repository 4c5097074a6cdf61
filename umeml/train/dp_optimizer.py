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
- the noise is ONE draw over the flat (N,) buffer with the same standard deviation
  ``noise_multiplier * max_grad_norm``: seeded (``secure_mode`` False, tests and simulations),
  one call of Opacus's own ``_generate_noise`` with the given generator; secure (a site),
  :func:`umeml.train.secure_random.os_gaussian_like`, Opacus's secure construction (the sum of
  four draws halved) on uniforms from the OS's CSPRNG, never a torch generator (32-bit seeds; a
  parameter set the fused path cannot take is refused rather than noised per tensor by Opacus).
  Every coordinate gets independent N(0, std^2) noise, as with Opacus; only the order in which
  the numbers land on the coordinates differs;
- ``p.summed_grad`` and ``p.grad`` are views of the flat buffers, so the wrapped optimizer,
  FedProx's gradient edit and Opacus's processed-flag checks see ordinary per-parameter tensors.

Clip groups (``clip_groups``, ``federation.dp_recipe.clip_groups: heads``): instead of one norm
over all trainable tensors, each group of parameters (each task head, and the rest of the
trainable model as one group) is clipped to its own norm ``C_k = C / sqrt(K)`` (K groups present).
A sample's clipped gradient then has norm at most ``sqrt(sum_k C_k^2) = C``, the same L2
sensitivity as joint clipping at ``C = max_grad_norm``, so the same noise ``N(0, (sigma C)^2)`` on
every coordinate and the same accounting are exact. What changes is the split of that
sensitivity: under joint clipping a head whose loss gradient is small next to the others' gets
only its share of C (the survival head of the linear model about half), under the same noise.

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

from umeml.train.secure_random import os_gaussian_like

__all__ = ["FusedDPOptimizer", "group_clip_norms"]


def _split_like(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views of the flat (N,) ``flat`` shaped like each parameter, in order."""
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]


def group_clip_norms(max_grad_norm: float, n_groups: int) -> float:
    """Each group's clip norm when ``n_groups`` groups share the sensitivity ``max_grad_norm``:
    ``C / sqrt(K)``, so that ``sqrt(K C_k^2) = C``."""
    if n_groups < 1:
        raise ValueError("clip groups: need at least one group")
    return max_grad_norm / n_groups ** 0.5


class FusedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose clip, accumulate, noise and scale run once on flat buffers.

    Same constructor and semantics as :class:`opacus.optimizers.DPOptimizer`; see the module
    docstring for what is fused and what stays Opacus's. ``clip_groups`` (optional, keyword):
    one group label per parameter of ``self.params``, in order; each group is clipped to
    :func:`group_clip_norms` (module docstring). None: one joint norm, as Opacus.
    """

    def __init__(self, *args, clip_groups: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._column_groups: torch.Tensor | None = None  # (N,) group index of each flat column
        self.n_clip_groups = 1
        if clip_groups is not None:
            if len(clip_groups) != len(self.params):
                raise ValueError(f"clip_groups: {len(clip_groups)} labels for {len(self.params)} parameters")
            if not self._fusable(self.params):
                raise ValueError("clip_groups: the fused path needs every parameter on one dtype and device")
            labels = sorted(set(clip_groups))
            index = [labels.index(g) for g in clip_groups]
            self._column_groups = torch.cat([torch.full((p.numel(),), i, dtype=torch.long, device=p.device)
                                             for i, p in zip(index, self.params)])
            self.n_clip_groups = len(labels)
        self._summed_flat: torch.Tensor | None = None  # what the p.summed_grad views point into
        self._grad_flat: torch.Tensor | None = None  # what the p.grad views point into
        self._views_summed_grad: list[torch.Tensor] = []
        self._views_grad: list[torch.Tensor] = []
        self.last_clip_factors: torch.Tensor | None = None  # (B,) or (B, K) of the last clipped batch

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
            if self._column_groups is not None:
                raise ValueError("clip_groups: the parameters no longer share one dtype and device")
            if self.secure_mode:  # Opacus's per-tensor path would draw the noise from a torch generator
                raise ValueError("secure DP noise: the trainable parameters must share one dtype and device")
            self._summed_flat = None
            return super().clip_and_accumulate()
        for p in params:
            _check_processed_flag(p.grad_sample)
        samples = [self._get_flat_grad_sample(p) for p in params]
        n, dtype = len(samples[0]), params[0].dtype
        flat = torch.cat([g.reshape(n, p.numel()).to(dtype) for g, p in zip(samples, params)], dim=1)
        factors, summed = self._clip(flat)
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

    def _clip(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip factors ((B,), or (B, K) with clip groups) and the clipped sum (N,) of ``flat`` (B, N)."""
        n, groups = flat.shape[0], self._column_groups
        if groups is None:
            if n == 0:  # empty batch: nothing to clip, the clipped sum is zero
                factors = flat.new_zeros(0)
            else:
                factors = (self.max_grad_norm / (torch.linalg.vector_norm(flat, dim=1) + 1e-6)).clamp(max=1.0)
            return factors, factors @ flat
        # per sample and group: the norm of that group's columns, clipped to C_k (same 1e-6 as Opacus)
        squares = flat.new_zeros(n, self.n_clip_groups).index_add_(1, groups, flat * flat)
        limit = group_clip_norms(self.max_grad_norm, self.n_clip_groups)
        factors = (limit / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        return factors, (factors[:, groups] * flat).sum(dim=0)

    def add_noise(self) -> None:
        """One Gaussian draw over the flat clipped sum (secure: the OS's CSPRNG; seeded: Opacus's
        generator); ``p.grad`` = views."""
        params = self.params
        if not self._owns("summed_grad", self._summed_flat, params):
            self._grad_flat = None
            if self.secure_mode:  # Opacus's per-tensor noise would come from a torch generator
                raise RuntimeError("secure DP noise: the clipped sums are not the fused buffer's views")
            return super().add_noise()
        _check_processed_flag([p.summed_grad for p in params])
        std = self.noise_multiplier * self.max_grad_norm
        if self.secure_mode:  # a site: the OS's CSPRNG, never a torch generator (module docstring)
            noise = os_gaussian_like(self._summed_flat, std)
        else:
            noise = _generate_noise(std=std, reference=self._summed_flat, generator=self.generator, secure_mode=False)
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

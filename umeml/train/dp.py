"""Local DP-SGD with Opacus: Poisson-sampled bags, per-sample clipping, Gaussian noise.

A site trains with :func:`train_dp_steps`; the accounting (how many steps the budget allows,
epsilon after the round) lives in :mod:`umeml.federation.privacy`.

- **Poisson sampling**: every training patient joins each batch independently with
  probability ``sample_rate`` (Opacus's ``UniformWithReplacementSampler``), batches go through
  the usual padding collate. A batch can be empty (the first one too): the step is still taken,
  with noise only, because the accountant counts it and skipping it would leak that it was empty.
- **Clipping and noise**: Opacus's ``GradSampleModule`` computes each patient's gradient (exact
  for every registry model, see ``tests/test_opacus_grads.py``), the DP optimizer clips each to
  ``max_grad_norm``, sums, adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` and divides by the
  expected batch size. By default that optimizer is
  :class:`~umeml.train.dp_optimizer.FusedDPOptimizer` (the same arithmetic and noise on one flat
  buffer instead of per tensor); ``fused=False`` uses Opacus's stock ``DPOptimizer``.
- **Clip groups** (``clip_groups="heads"``, ``federation.dp_recipe.clip_groups``): each task
  head and the rest of the trainable model clipped separately, to ``C / sqrt(K)`` each, so the
  sensitivity stays ``max_grad_norm`` and the noise and the accounting are unchanged (see
  :mod:`umeml.train.dp_optimizer`): a head no longer gets only the share of C that its gradient
  has next to the other heads'.
- **FedProx**: Opacus only sees per-sample gradients, so a parameter-only loss term such as
  mu/2 ||w - w_global||^2 would be silently dropped. Its gradient mu (w - w_global) is added to
  the privatised gradient after clipping and noise, before the optimizer step. It depends on no
  patient, so it costs no privacy.
- **Randomness**: a site's Poisson sampling and noise come from the OS's CSPRNG
  (:mod:`umeml.train.secure_random`, with Opacus's secure construction of the noise), never from
  a torch generator (32-bit seeds), so nobody can reproduce or subtract them. Tests and
  simulations may pass a seed (torch generators: reproducible, not secure).
- Gradient accumulation and AMP are not used under DP (one Poisson batch is one step).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from umeml.config import DPConfig
from umeml.data.batch import Batch
from umeml.train.loop import LossSettings, batch_loss
from umeml.train.secure_random import OSPoissonSampler

REFUSAL_NO_SITE_DP = (
    "the experiment requires local DP (federation.local_dp.enabled) but this site has no enabled "
    "'dp' section in its site file; the site does not train (the coordinator cannot set a site's "
    "privacy terms). It still answers evaluation requests."
)


def resolve_dp(site: DPConfig | None, requested: DPConfig) -> tuple[DPConfig | None, str | None]:
    """The DP settings a site trains with, or why it refuses to train.

    The site's own ``dp`` section decides. An experiment that asks for local DP can only lower
    the site's budget (``target_epsilon`` and ``delta`` become the smaller of the two); noise,
    clipping norm and accountant stay the site's. A site without DP refuses an experiment that
    requires it. Returns ``(settings, None)``, ``(None, None)`` (no DP) or ``(None, reason)``.
    """
    if site is None or not site.enabled:
        return (None, REFUSAL_NO_SITE_DP) if requested.enabled else (None, None)
    if requested.enabled:
        site = replace(site, target_epsilon=min(site.target_epsilon, requested.target_epsilon),
                       delta=min(site.delta, requested.delta))
    return site, None


def poisson_loader(dataset, sample_rate: float, steps: int, generator: torch.Generator | None,
                   num_workers: int = 0) -> DataLoader:
    """``steps`` Poisson-sampled batches of ``dataset`` (possibly empty) with its padding collate;
    ``generator`` None draws the sampling from the OS's CSPRNG (a site; :mod:`umeml.train.secure_random`)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if generator is None:
        sampler = OSPoissonSampler(len(dataset), sample_rate, steps)
    else:
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                                generator=generator, steps=steps)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=num_workers)


SAMPLING_STREAM, NOISE_STREAM = 0, 1


def torch_seed(seed: int, stream: int = 0) -> int:
    """A seed for a torch generator that depends on every bit of ``seed`` and on ``stream``.

    torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``'s argument, so
    seeds that differ only above bit 31 (a simulation's ``experiment seed << 32 | site``) gave
    identical Poisson batches and noise for every experiment seed, and ``seed + 1`` (the noise)
    was the next round's ``seed`` (its sampling). Mixed through NumPy's ``SeedSequence`` into 32
    bits, per stream."""
    return int(np.random.SeedSequence(int(seed) % 2 ** 128, spawn_key=(int(stream),)).generate_state(1)[0])


CLIP_GROUPS = ("joint", "heads")
_HEAD = re.compile(r"(?:^|\.)heads\.heads\.([^.]+)\.")  # a TaskHeads head: <...>heads.heads.<task>.weight


def clip_group_labels(model: nn.Module, params: list[nn.Parameter], clip_groups: str) -> list[str] | None:
    """One clip-group label per parameter in ``params`` (None for ``"joint"``): ``"head:<task>"``
    for a task head's parameters, ``"trunk"`` for every other trainable parameter."""
    if clip_groups not in CLIP_GROUPS:
        raise ValueError(f"clip_groups: {clip_groups!r} is not one of {list(CLIP_GROUPS)}")
    if clip_groups == "joint":
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    labels = []
    for p in params:
        head = _HEAD.search(names.get(id(p), ""))
        labels.append(f"head:{head.group(1)}" if head else "trunk")
    return labels


class DPSGD:
    """Opacus's per-sample clipping and noise around ``model`` and ``optimizer``.

    ``step(batch)`` takes one DP-SGD step on one Poisson batch (an empty batch gives a
    noise-only step). ``close()`` removes the hooks; the wrapped ``model`` keeps its weights.
    ``fused`` picks :class:`~umeml.train.dp_optimizer.FusedDPOptimizer` (default) or Opacus's
    stock ``DPOptimizer`` (same result, slower; kept for comparison). ``clip_groups``:
    ``"joint"`` (one norm over all trainable tensors, as Opacus) or ``"heads"`` (per task head
    and the rest; fused optimizer only, see :func:`clip_group_labels`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, generator: torch.Generator | None = None,
                 secure_mode: bool = True, fused: bool = True, clip_groups: str = "joint"):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from umeml.model import register_dp_grad_samplers
        from umeml.train.dp_optimizer import FusedDPOptimizer

        register_dp_grad_samplers()
        labels = clip_group_labels(model, [p for g in optimizer.param_groups for p in g["params"]
                                           if p.requires_grad], clip_groups)
        if labels is not None and not fused:
            raise ValueError("clip_groups 'heads' needs the fused DP optimizer (fused=True)")
        if secure_mode and not fused and generator is None:
            # Opacus's own optimizer would draw from torch's global generator (32-bit seed, not secure)
            raise ValueError("secure DP noise needs the fused DP optimizer (fused=True); Opacus's stock "
                             "optimizer (fused=False) is for comparisons and takes an explicit generator")
        cls = FusedDPOptimizer if fused else DPOptimizer
        extra = {} if labels is None else {"clip_groups": labels}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's notices about secure RNG and hooks
            # "sum": the per-sample gradients of the summed loss are each patient's own gradient
            # as they come; "mean" would have Opacus multiply every layer's backprops by the batch
            # size (one more pass per layer). The optimizer still divides by the expected batch size.
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            self.optimizer = cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 expected_batch_size=expected_batch_size, loss_reduction="mean",
                                 generator=generator, secure_mode=secure_mode, **extra)
        self.params: list[nn.Parameter] = list(self.optimizer.params)

    def step(self, batch: Batch, loss: LossSettings, device: torch.device,
             after_noise: Callable[[list[nn.Parameter]], None] | None = None) -> tuple[float, int]:
        """One step; returns the batch's summed loss and its size. ``after_noise`` edits the
        privatised gradients (FedProx) before the optimizer applies them."""
        self.optimizer.zero_grad(set_to_none=True)
        n, total = len(batch), 0.0
        if n:
            batch = batch.to(device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                per_sample = batch_loss(self.module, batch, loss)
                per_sample.sum().backward()
            total = float(per_sample.detach().sum())
        for p in self.params:
            # a parameter unused by this batch (or an empty batch) has zero per-sample gradients
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
        if after_noise is not None:
            after_noise(self.params)
        self.optimizer.original_optimizer.step()
        return total, n

    def close(self) -> None:
        """Drop per-sample state and hooks."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module.remove_hooks()
        self.module.cleanup()


def proximal_gradient(mu: float, anchor: list[torch.Tensor]) -> Callable[[list[nn.Parameter]], None]:
    """Adds mu (w - w_global), the gradient of mu/2 ||w - w_global||^2, to each parameter's gradient."""

    def apply(params: list[nn.Parameter]) -> None:
        for p, a in zip(params, anchor):
            p.grad.add_(p.detach() - a, alpha=mu)

    return apply


def poisson_epochs(dataset, sample_rate: float, steps: int, steps_per_epoch: int, generator: torch.Generator,
                   num_workers: int = 0, on_epoch: Callable[[int], None] | None = None):
    """``steps`` Poisson batches of ``dataset`` in epochs of ``steps_per_epoch`` (``on_epoch(e)``
    before each epoch: the dataset's per-epoch patch sampling)."""
    done, epoch = 0, 0
    while done < steps:
        k = min(steps_per_epoch, steps - done)
        if on_epoch is not None:
            on_epoch(epoch)
        yield from poisson_loader(dataset, sample_rate, k, generator, num_workers)
        done, epoch = done + k, epoch + 1


def train_dp_steps(model: nn.Module, dataset, optimizer: torch.optim.Optimizer, loss: LossSettings,
                   device: torch.device, *, sample_rate: float, noise_multiplier: float, max_grad_norm: float,
                   steps: int, steps_per_epoch: int, proximal_mu: float = 0.0, seed: int | None = None,
                   num_workers: int = 0, on_epoch: Callable[[int], None] | None = None,
                   fused: bool = True, clip_groups: str = "joint") -> dict:
    """``steps`` DP-SGD steps over Poisson batches of ``dataset``, in epochs of ``steps_per_epoch``.

    ``seed`` None takes sampling and noise from OS entropy with Opacus's secure noise (what a
    site does); a seed makes the run reproducible (tests only: whoever knows the seed can
    remove the noise). ``fused`` False uses Opacus's stock optimizer, ``clip_groups`` splits
    the clipping norm over the task heads (see :class:`DPSGD`).
    Returns the mean loss, samples and steps seen and the empty batches.
    """
    secure = seed is None
    sampling = noise = None  # a site: sampling and noise from the OS's CSPRNG (umeml.train.secure_random)
    if not secure:
        sampling = torch.Generator().manual_seed(torch_seed(int(seed), SAMPLING_STREAM))
        noise = torch.Generator(device=device).manual_seed(torch_seed(int(seed), NOISE_STREAM))
    model.train()
    dp = DPSGD(model, optimizer, noise_multiplier, max_grad_norm,
               expected_batch_size=max(sample_rate * len(dataset), 1e-12), generator=noise, secure_mode=secure,
               fused=fused, clip_groups=clip_groups)
    after = None
    if proximal_mu > 0:
        after = proximal_gradient(proximal_mu, [p.detach().clone() for p in dp.params])
    total, n, sizes = 0.0, 0, []
    try:
        for batch in poisson_epochs(dataset, sample_rate, steps, steps_per_epoch, sampling, num_workers, on_epoch):
            s, b = dp.step(batch, loss, device, after)
            total, n = total + s, n + b
            sizes.append(b)
    finally:
        dp.close()
    return {"loss": total / max(n, 1), "num_examples": n, "steps": len(sizes),
            "empty_batches": sum(1 for b in sizes if b == 0), "batch_sizes": sizes}


def train_poisson_steps(model: nn.Module, dataset, optimizer: torch.optim.Optimizer, loss: LossSettings,
                        device: torch.device, *, sample_rate: float, steps: int, steps_per_epoch: int,
                        proximal_mu: float = 0.0, seed: int = 0, num_workers: int = 0,
                        on_epoch: Callable[[int], None] | None = None) -> dict:
    """:func:`train_dp_steps` without DP: the same Poisson batches, steps and gradient scale
    (the summed loss divided by the expected batch size, as DP-SGD divides its clipped sum),
    no per-sample clipping and no noise. The non-private twin of a DP run
    (``federation.dp_recipe.apply_without_dp``): the two differ in clipping and noise only.
    An empty batch takes no step (with no noise there is nothing to apply).
    """
    sampling = torch.Generator().manual_seed(torch_seed(int(seed), SAMPLING_STREAM))
    expected = max(sample_rate * len(dataset), 1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    after = proximal_gradient(proximal_mu, [p.detach().clone() for p in params]) if proximal_mu > 0 else None
    model.train()
    total, n, sizes = 0.0, 0, []
    for batch in poisson_epochs(dataset, sample_rate, steps, steps_per_epoch, sampling, num_workers, on_epoch):
        sizes.append(len(batch))
        if not len(batch):
            continue
        optimizer.zero_grad(set_to_none=True)
        per_sample = batch_loss(model, batch.to(device), loss)
        (per_sample.sum() / expected).backward()
        if after is not None:
            for p in params:  # a parameter this batch did not use still feels the proximal pull
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            after(params)
        optimizer.step()
        total, n = total + float(per_sample.detach().sum()), n + len(batch)
    return {"loss": total / max(n, 1), "num_examples": n, "steps": len(sizes),
            "empty_batches": sum(1 for b in sizes if b == 0), "batch_sizes": sizes}

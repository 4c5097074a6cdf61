"""DP-compatible building blocks shared by UMEML and the baselines (design section 5).

Rules every block follows, so that Opacus computes exact per-sample gradients with its hooks:

- every parameter lives in a leaf module that Opacus knows (``nn.Linear``, ``nn.LayerNorm``)
  or in :class:`LearnedTokens`, for which a grad sampler is registered below; composite modules
  own no parameters directly (Opacus would otherwise treat the whole composite as one layer);
- tensors are batch-first and every operation is separable over the batch axis (no BatchNorm,
  no statistics across bags), so a bag's output never depends on the other bags in its batch;
- attention is ``nn.Linear`` + ``F.scaled_dot_product_attention``, never
  ``nn.MultiheadAttention``; padding is handled with boolean key masks;
- a module is called once per forward pass (Opacus pairs one activation with one backprop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "BilinearFusion",
    "ConcatFusion",
    "CrossAttentionBlock",
    "DropPath",
    "GatedAttentionPool",
    "LearnedTokens",
    "ModelOutput",
    "ProportionalHazards",
    "SNNBlock",
    "SelfAttentionLayer",
    "TaskHeads",
    "dropout",
    "masked_mean",
    "safe_key_mask",
]


@dataclass
class ModelOutput:
    """What every registered model returns.

    - ``logits``: task name -> (B, n_out) tensor;
    - ``aux_loss``: (B,) per-bag auxiliary loss already weighted (UMEML: gamma * L_mod);
      zeros for models without one. Per-bag, so that DP-SGD can clip per sample;
    - ``attention``: optional extra tensors for inspection (e.g. attention weights).
    """

    logits: dict[str, torch.Tensor]
    aux_loss: torch.Tensor
    attention: dict[str, torch.Tensor] | None = None


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when ``p == 0`` (no random op in the graph)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """Key mask where a row with no True entry gets its first key enabled.

    ``F.scaled_dot_product_attention`` (and a masked softmax) returns NaN for a query whose keys
    are all masked; the NaN would then poison gradients even if the row's output is discarded by
    ``torch.where``. Enabling one (zero-padded) key keeps everything finite; callers replace the
    result of such bags by a learned missing-modality token.
    """
    empty = ~mask.any(dim=1)
    if not bool(empty.any()):
        return mask
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (first & empty[:, None])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, M, d) over the positions where ``mask`` (B, M) is True; zeros if none."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class LearnedTokens(nn.Module):
    """``n`` learnable d-dimensional tokens (prototypes, class/register/missing tokens).

    ``forward(ref)`` returns the tokens expanded to the batch size of ``ref`` (B, n, d): one input
    tensor with a batch axis is what Opacus's hooks need to give the tokens per-sample gradients
    (see the grad sampler registered below). ``ref`` must not require grad (pass a mask or a
    detached tensor): the output does not depend on it, and PyTorch's full backward hook, which
    Opacus uses, never fires for a module whose input requires grad but receives none.
    """

    def __init__(self, n: int, dim: int, std: float = 0.02):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(n, dim))
        nn.init.trunc_normal_(self.tokens, std=std, a=-2 * std, b=2 * std)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        """Tokens for every bag of ``ref`` (any tensor whose first axis is the batch)."""
        if ref.requires_grad:
            raise ValueError("LearnedTokens: the batch reference must not require grad (use a mask)")
        return self.tokens.unsqueeze(0).expand(ref.shape[0], -1, -1)


def _tokens_grad_sample(layer: LearnedTokens, activations, backprops: torch.Tensor) -> dict:
    # output[i] = tokens for every bag i, so d loss_i / d tokens = backprops[i] exactly.
    return {layer.tokens: backprops}


def register_dp_grad_samplers() -> None:
    """Teach Opacus the exact per-sample gradient of :class:`LearnedTokens` (idempotent).

    Called before a model is wrapped for DP. Opacus is imported here, not at module import,
    because importing it costs about 2 s, and a site's ClientApp is a fresh process per message.
    """
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    if GradSampleModule.GRAD_SAMPLERS.get(LearnedTokens) is not _tokens_grad_sample:
        register_grad_sampler(LearnedTokens)(_tokens_grad_sample)


class DropPath(nn.Module):
    """Stochastic depth per sample: drops a residual branch for a random subset of bags."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity at eval time or when p == 0; otherwise a per-bag Bernoulli keep mask."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.bernoulli(torch.full(shape, keep, dtype=x.dtype, device=x.device))
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head attention from ``nn.Linear`` + ``F.scaled_dot_product_attention``.

    ``forward(query (B,Lq,d), context (B,Lk,d), key_mask (B,Lk) bool True=real | None)``.
    Keys and values come from one fused linear layer (one call, one Opacus activation).
    A row of ``key_mask`` must have at least one True entry (see :func:`safe_key_mask`).
    """

    def __init__(self, dim: int, n_heads: int = 1, drop: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = dropout(drop)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``query`` to ``context``; returns (B, Lq, d)."""
        b, lq, d = query.shape
        lk = context.shape[1]
        h = self.n_heads
        q = self.q(query).reshape(b, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, lq, d)
        return self.drop(self.proj(out))


class CrossAttentionBlock(nn.Module):
    """Prototype update of design 5.1: ``P <- P + DropPath(LayerNorm(CrossAttn(P, H)))``."""

    def __init__(self, dim: int, n_heads: int, drop: float, drop_path: float):
        super().__init__()
        self.attn = Attention(dim, n_heads, drop)
        self.norm = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, protos: torch.Tensor, patches: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Queries = prototypes (B,K,d); keys/values = patches (B,M,d) with padding mask."""
        return protos + self.drop_path(self.norm(self.attn(protos, patches, key_mask)))


class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer layer over a short token sequence (no padding: fixed token count).

    ``x <- x + DropPath(Attn(LN(x)))``; ``x <- x + DropPath(MLP(LN(x)))`` with an MLP of width
    ``dim`` (GELU). The sequences here are 2-20 tokens long, so the layer costs nothing next to
    the patch-level work.
    """

    def __init__(self, dim: int, n_heads: int, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), dropout(drop), nn.Linear(dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, d)."""
        n = self.norm1(x)
        x = x + self.drop_path(self.attn(n, n))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SNNBlock(nn.Module):
    """Self-normalising block: Linear + ELU + AlphaDropout, LeCun-normal init (as in MCAT/PORPOISE)."""

    def __init__(self, in_dim: int, out_dim: int, drop: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.act = nn.ELU()
        self.drop = nn.AlphaDropout(drop) if drop > 0 else nn.Identity()
        nn.init.normal_(self.linear.weight, 0.0, 1.0 / math.sqrt(max(in_dim, 1)))
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.drop(self.act(self.linear(x)))


class GatedAttentionPool(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018) over a padded bag.

    ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``, softmax over the real patches, output
    ``sum_i a_i h_i``. ``mask`` must have a True entry per row (see :func:`safe_key_mask`).
    """

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = dropout(drop)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns pooled (B, d) and attention weights (B, M)."""
        gate = torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))
        logits = self.w(self.drop(gate)).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return (weights.unsqueeze(-1) * h).sum(dim=1), weights


class ConcatFusion(nn.Module):
    """Concatenate modality vectors, then Linear-ReLU-Dropout-Linear-ReLU (concat-MLP fusion)."""

    def __init__(self, in_dims: list[int], dim: int, drop: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(sum(in_dims), dim), nn.ReLU(), dropout(drop), nn.Linear(dim, dim), nn.ReLU()
        )

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """(B, d_i) tensors -> (B, dim)."""
        return self.mlp(torch.cat(xs, dim=-1))


class BilinearFusion(nn.Module):
    """Bilinear (Kronecker) fusion of two vectors, built from ``nn.Linear`` only.

    Each modality is projected to ``rank`` dims (Linear + ReLU), a constant 1 is appended (so the
    product keeps the unimodal terms, as in Pathomic Fusion), and the flattened outer product
    ``[a; 1] (x) [b; 1]`` goes through Linear + ReLU + Dropout. ``nn.Bilinear`` is avoided: it
    takes two inputs, which Opacus's per-layer hooks do not support.
    """

    def __init__(self, dim: int, rank: int, drop: float):
        super().__init__()
        self.pa = nn.Linear(dim, rank)
        self.pb = nn.Linear(dim, rank)
        self.out = nn.Sequential(nn.Linear((rank + 1) ** 2, dim), nn.ReLU(), dropout(drop))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> (B, d)."""
        one = a.new_ones(a.shape[0], 1)
        a1 = torch.cat([F.relu(self.pa(a)), one], dim=-1)
        b1 = torch.cat([F.relu(self.pb(b)), one], dim=-1)
        return self.out((a1.unsqueeze(2) * b1.unsqueeze(1)).flatten(1))


class ProportionalHazards(nn.Module):
    """Discrete-time proportional-hazards head: ``logit_k = b_k + w . z`` (B, n_bins).

    One risk direction ``w`` shared by every time bin plus a baseline ``b_k`` per bin (the
    discrete-time logistic hazard model), instead of a free linear map per bin. Why: with a free
    map a bin's weights can point anywhere, and the risk score ``-sum_k S_k`` is then not monotone
    in any one direction of ``z`` (tests/test_survival_head.py builds such a head). Here every
    bin's signal moves the same ``w`` and the risk is monotone in ``w . z`` by construction, with
    ``dim + n_bins`` parameters instead of ``(dim + 1) n_bins``. Tried against the linear rows'
    low c-index under DP, it did not help (docs/benchmarks.md, "Proportional survival head"), so
    it is an option, not the default. The baselines are :class:`LearnedTokens` (exact per-sample
    gradients) and ``w`` an ``nn.Linear`` without bias (the baselines are its bias).
    """

    def __init__(self, dim: int, n_bins: int):
        super().__init__()
        self.risk = nn.Linear(dim, 1, bias=False)
        self.baseline = LearnedTokens(1, n_bins)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> hazard logits (B, n_bins)."""
        return self.baseline(z.detach())[:, 0] + self.risk(z)


SURVIVAL_HEADS = ("bins", "proportional")


class TaskHeads(nn.Module):
    """One linear head per task on the fused representation: ``{task: (B, n_out)}``.

    ``survival_head`` chooses the survival task's head: ``"bins"`` (a free ``nn.Linear`` per
    bin, the published models' head) or ``"proportional"`` (:class:`ProportionalHazards`).
    """

    def __init__(self, dim: int, heads: dict[str, int], survival_head: str = "bins"):
        super().__init__()
        if not heads:
            raise ValueError("heads: give at least one task, e.g. {'grade': 3}")
        if survival_head not in SURVIVAL_HEADS:
            raise ValueError(f"survival_head must be one of {', '.join(SURVIVAL_HEADS)}, got {survival_head!r}")
        for task, n_out in heads.items():
            if not isinstance(n_out, int) or n_out < 1:
                raise ValueError(f"heads[{task!r}]: output size must be a positive int, got {n_out!r}")
        self.heads = nn.ModuleDict({
            task: ProportionalHazards(dim, n_out) if task == "survival" and survival_head == "proportional"
            else nn.Linear(dim, n_out) for task, n_out in heads.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, dim) -> dict of logits."""
        return {task: head(z) for task, head in self.heads.items()}

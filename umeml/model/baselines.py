"""Baselines in the same harness as UMEML: ABMIL, SNN and their late fusion.

Each takes the same inputs as UMEML and returns a :class:`ModelOutput` with ``aux_loss`` zeros.
A patient lacking the modality a branch reads gets that branch's learned missing-modality token
instead of its representation (selected with ``torch.where`` over the full batch).
"""

from __future__ import annotations

import torch
from torch import nn

from umeml.config import ModelConfig
from umeml.model.blocks import (
    BilinearFusion,
    ConcatFusion,
    GatedAttentionPool,
    LearnedTokens,
    ModelOutput,
    SNNBlock,
    TaskHeads,
    dropout,
    safe_key_mask,
)
from umeml.model.registry import register_model
from umeml.model.umeml_model import ensure_patch_axis, split_groups

__all__ = ["ABMIL", "LateFusion", "SNN", "ABMILBranch", "SNNBranch"]


class ABMILBranch(nn.Module):
    """Gated-attention MIL: patches -> Linear+ReLU+Dropout -> gated attention pooling -> (B, d)."""

    def __init__(self, feature_dim: int, cfg: ModelConfig):
        super().__init__()
        if feature_dim < 1:
            raise ValueError("a pathology branch needs feature_dim >= 1")
        d = cfg.hidden_dim
        self.proj = nn.Sequential(nn.Linear(feature_dim, d), nn.ReLU(), dropout(cfg.dropout))
        self.pool = GatedAttentionPool(d, d, cfg.dropout)
        self.missing = LearnedTokens(1, d)

    def forward(self, features, patch_mask, has_path) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag vectors (B, d) (missing token where no pathology) and attention weights (B, M)."""
        features, patch_mask = ensure_patch_axis(features, patch_mask)
        valid = patch_mask.bool() & has_path.bool()[:, None]
        ok = valid.any(dim=1)
        h = self.proj(features)
        z, weights = self.pool(h, safe_key_mask(valid))
        z = torch.where(ok[:, None], z, self.missing(has_path)[:, 0])
        return z, weights * valid.to(weights.dtype)


class SNNBranch(nn.Module):
    """Self-normalising network over all genomic features (two SNN blocks) -> (B, d)."""

    def __init__(self, group_sizes: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        if not group_sizes:
            raise ValueError("a genomic branch needs at least one gene group")
        d = cfg.hidden_dim
        self.group_sizes = tuple(group_sizes)
        self.net = nn.Sequential(SNNBlock(sum(group_sizes), d, cfg.dropout), SNNBlock(d, d, cfg.dropout))
        self.missing = LearnedTokens(1, d)

    def forward(self, genomics, has_genomics) -> torch.Tensor:
        """(B, G) -> (B, d), missing token where no genomics."""
        split_groups(genomics, self.group_sizes)  # shape check only
        z = self.net(genomics)
        return torch.where(has_genomics.bool()[:, None], z, self.missing(has_genomics)[:, 0])


def _zeros(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(ref.shape[0], dtype=dtype, device=ref.device)


@register_model("abmil")
class ABMIL(nn.Module):
    """Pathology-only gated attention MIL (Ilse et al. 2018); genomics are never read."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]):
        super().__init__()
        d = cfg.hidden_dim
        self.branch = ABMILBranch(feature_dim, cfg)
        self.rho = nn.Sequential(nn.Linear(d, d), nn.ReLU(), dropout(cfg.dropout))
        self.heads = TaskHeads(d, heads)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics) -> ModelOutput:
        """See :class:`umeml.model.UMEML`; ``attention['patch']`` holds the MIL weights."""
        z, weights = self.branch(features, patch_mask, has_path)
        return ModelOutput(
            logits=self.heads(self.rho(z)),
            aux_loss=_zeros(has_path, z.dtype),
            attention={"patch": weights.detach()},
        )


@register_model("snn")
class SNN(nn.Module):
    """Genomics-only self-normalising network over all genomic features; patches never read."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]):
        super().__init__()
        self.branch = SNNBranch(group_sizes, cfg)
        self.heads = TaskHeads(cfg.hidden_dim, heads)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics) -> ModelOutput:
        """See :class:`umeml.model.UMEML`."""
        z = self.branch(genomics, has_genomics)
        return ModelOutput(logits=self.heads(z), aux_loss=_zeros(has_genomics, z.dtype))


@register_model("late_fusion")
class LateFusion(nn.Module):
    """ABMIL bag vector and SNN vector fused (concat-MLP, or bilinear if ``cfg.fusion``)."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]):
        super().__init__()
        d = cfg.hidden_dim
        self.path = ABMILBranch(feature_dim, cfg)
        self.gen = SNNBranch(group_sizes, cfg)
        if cfg.fusion == "bilinear":
            self.fusion = BilinearFusion(d, rank=min(d, 32), drop=cfg.dropout)
        else:
            self.fusion = ConcatFusion([d, d], d, cfg.dropout)
        self.heads = TaskHeads(d, heads)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics) -> ModelOutput:
        """See :class:`umeml.model.UMEML`."""
        zp, weights = self.path(features, patch_mask, has_path)
        zg = self.gen(genomics, has_genomics)
        return ModelOutput(
            logits=self.heads(self.fusion(zp, zg)),
            aux_loss=_zeros(has_path, zp.dtype),
            attention={"patch": weights.detach()},
        )

"""Baselines in the same harness as UMEML: ABMIL, SNN, their late fusion, and a linear model.

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
    masked_mean,
    safe_key_mask,
)
from umeml.model.registry import register_model
from umeml.model.umeml_model import ensure_patch_axis, split_groups

__all__ = ["ABMIL", "LateFusion", "LinearBaseline", "SNN", "ABMILBranch", "SNNBranch"]


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
        features, patch_mask, _ = ensure_patch_axis(features, patch_mask)
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
        self.heads = TaskHeads(d, heads, cfg.survival_head)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics, coords=None) -> ModelOutput:
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
        self.heads = TaskHeads(cfg.hidden_dim, heads, cfg.survival_head)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics, coords=None) -> ModelOutput:
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
        self.heads = TaskHeads(d, heads, cfg.survival_head)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics, coords=None) -> ModelOutput:
        """See :class:`umeml.model.UMEML`."""
        zp, weights = self.path(features, patch_mask, has_path)
        zg = self.gen(genomics, has_genomics)
        return ModelOutput(
            logits=self.heads(self.fusion(zp, zg)),
            aux_loss=_zeros(has_path, zp.dtype),
            attention={"patch": weights.detach()},
        )


@register_model("linear")
class LinearBaseline(nn.Module):
    """Linear heads on [masked mean of the patch features; genomic vector] (the classical baseline).

    The pathology part is the mean of the patient's real patch features (the extractor's features,
    as they are); the genomic part is the genomic vector as the dataset gives it (standardised
    with the training statistics). A patient without pathology (``has_path`` False or no real
    patch), or without genomics, gets that part's learned missing token (input-sized, initialised
    near zero) instead: near zero imputation at the start, and the heads learn the offset a missing
    modality deserves, which is what a missing-indicator column would learn. Tokens rather than
    indicator columns keep one missing-modality mechanism for every registered model.

    ``model.modalities`` chooses the parts; ``model.linear_rank`` k > 0 puts a bias-free
    ``nn.Linear`` to k dimensions (``project``) between the inputs and the heads (a model trained
    on public data whose heads alone are fine-tuned under DP: k x outputs private weights instead
    of inputs x outputs); every other model hyper-parameter (``hidden_dim``, ``dropout``, ...) is
    ignored. Parameters live only in ``nn.Linear`` and :class:`LearnedTokens`, so Opacus's
    per-sample gradients are exact; with few parameters it is the model for DP-SGD at small sites.
    """

    def __init__(self, cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]):
        super().__init__()
        self.use_path = "pathology" in cfg.modalities
        self.use_gen = "genomics" in cfg.modalities
        width = 0
        if self.use_path:
            if feature_dim < 1:
                raise ValueError("linear with pathology needs feature_dim >= 1")
            self.missing_path = LearnedTokens(1, feature_dim)
            width += feature_dim
        if self.use_gen:
            if not group_sizes:
                raise ValueError("linear with genomics needs at least one gene group")
            self.group_sizes = tuple(group_sizes)
            self.missing_gen = LearnedTokens(1, sum(group_sizes))
            width += sum(group_sizes)
        rank = int(cfg.linear_rank)
        self.project = nn.Linear(width, rank, bias=False) if rank else None
        self.heads = TaskHeads(rank or width, heads, cfg.survival_head)

    def forward(self, features, patch_mask, genomics, has_path, has_genomics, coords=None) -> ModelOutput:
        """See :class:`umeml.model.UMEML`."""
        parts = []
        if self.use_path:
            features, patch_mask, _ = ensure_patch_axis(features, patch_mask)
            valid = patch_mask.bool() & has_path.bool()[:, None]
            z = masked_mean(features, valid)
            parts.append(torch.where(valid.any(dim=1)[:, None], z, self.missing_path(has_path)[:, 0]))
        if self.use_gen:
            split_groups(genomics, self.group_sizes)  # shape check only
            parts.append(torch.where(has_genomics.bool()[:, None], genomics, self.missing_gen(has_genomics)[:, 0]))
        z = torch.cat(parts, dim=1)
        if self.project is not None:
            z = self.project(z)
        return ModelOutput(logits=self.heads(z), aux_loss=_zeros(has_path, z.dtype))

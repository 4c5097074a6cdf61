"""UMEML (arXiv 2406.07078) as defined in design section 5, from DP-compatible blocks.

Data flow for a batch of B patients (d = hidden size, K prototypes, N gene groups, R registers):

1. pathology: patches -> Linear+ReLU+Dropout -> H (B,M,d); K prototypes cross-attend to H in two
   blocks ``P <- P + DropPath(LN(CrossAttn(P, H)))``; ``[t_p; P]`` -> one self-attention layer;
2. genomics: one SNN per gene group -> N tokens G; ``[t_g; G]`` -> two self-attention layers;
3. modularity loss on the patch graph with soft assignments of patches to P and to G;
4. ``[t_p; P; registers; t_g; G]`` -> two self-attention layers -> LN -> t_p, t_g -> fusion
   (concat-MLP or bilinear) -> one linear head per task.

Choices where the design is silent (documented here; the README should point to this list):

- Missing modality: the whole token group of a missing modality (``[t_p; P]`` or ``[t_g; G]``)
  is replaced by a learned missing-modality token group of the same length; the selection is a
  ``torch.where`` over the full batch (never a sub-batch), so per-sample gradients stay aligned.
  A patient counts as lacking pathology when ``has_path`` is False or its bag has no real patch.
- Modularity loss: as in the official code, the patch embeddings enter the loss detached (the
  affinity graph A and the patch side of the assignments are data, not something the encoder
  should bend to please the regulariser); gradients reach the prototypes and the gene tokens
  (and, through them, the encoders). S^p uses the prototypes after the two cross-attention
  blocks and S^g the gene tokens after the genomic encoder. The beta term is switched off per
  patient without genomics; a patient without pathology has no graph, so L_mod = 0.
- ``use_cross_attention=False``: the cross-attention blocks are replaced by masked mean pooling,
  ``P <- P + LN(Linear(mean_i H_i))``, i.e. the same residual update with attention weights fixed
  to uniform; the prototypes stay distinct learned vectors, so S^p and L_mod remain defined.
- Single modality: the other encoder is not built and its input is never read; the decoder runs
  on the remaining tokens (plus registers) and a one-input concat-MLP replaces the fusion.
- ``spatial_context="neighbours"``: each patch embedding gets its grid neighbours' mean
  (``umeml/model/spatial.py``) right after the projection, so the prototypes' cross-attention
  (or the mean-pool ablation), the assignments S^p and the modularity graph all see the
  context-aware H; the forward then needs ``coords`` for every batch with pathology.
- ``aux_loss`` is computed in train and eval mode (exact full bag in eval; the optional random
  patch subsample ``modularity_max_patches`` applies in training only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from umeml.config import ModelConfig
from umeml.model.blocks import (
    BilinearFusion,
    ConcatFusion,
    CrossAttentionBlock,
    LearnedTokens,
    ModelOutput,
    SelfAttentionLayer,
    SNNBlock,
    TaskHeads,
    dropout,
    masked_mean,
    safe_key_mask,
)
from umeml.model.modularity import modularity_loss, soft_assignments
from umeml.model.registry import register_model
from umeml.model.spatial import SpatialContext

__all__ = ["GenomicEncoder", "PathologyEncoder", "UMEML", "ensure_patch_axis", "split_groups"]


def ensure_patch_axis(features: torch.Tensor, patch_mask: torch.Tensor, coords: torch.Tensor | None = None):
    """Give a batch with M = 0 one masked zero patch, so attention kernels see a valid shape;
    returns ``(features, patch_mask, coords)`` (``coords`` None stays None)."""
    if features.shape[1] > 0:
        return features, patch_mask, coords
    b, _, dim = features.shape
    coords = None if coords is None else coords.new_zeros(b, 1, 2)
    return features.new_zeros(b, 1, dim), patch_mask.new_zeros(b, 1), coords


def split_groups(genomics: torch.Tensor, group_sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Split (B, G) genomics into its gene groups; checks that G = sum(group_sizes)."""
    if genomics.shape[1] != sum(group_sizes):
        raise ValueError(
            f"genomics has {genomics.shape[1]} columns but the gene groups {group_sizes} "
            f"add up to {sum(group_sizes)}"
        )
    return torch.split(genomics, list(group_sizes), dim=1)


class PathologyEncoder(nn.Module):
    """Patches -> H, prototypes P (cross-attention or mean-pool ablation), tokens [t_p; P]."""

    def __init__(self, feature_dim: int, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.proj = nn.Sequential(nn.Linear(feature_dim, d), nn.ReLU(), dropout(cfg.dropout))
        self.spatial = (SpatialContext(d, cfg.spatial_radius, cfg.spatial_gate_init)
                        if cfg.spatial_context == "neighbours" else None)
        # Unit-scale prototypes: they must be distinct directions for the cosine assignments and
        # of the same scale as the LayerNorm-ed updates added to them.
        self.prototypes = LearnedTokens(cfg.n_prototypes, d, std=1.0)
        if cfg.use_cross_attention:
            self.blocks = nn.ModuleList(
                CrossAttentionBlock(d, cfg.n_heads, cfg.dropout, cfg.drop_path) for _ in range(2)
            )
        else:
            self.blocks = None
            self.pool_proj = nn.Linear(d, d)
            self.pool_norm = nn.LayerNorm(d)
        self.cls = LearnedTokens(1, d)
        self.self_attn = SelfAttentionLayer(d, cfg.n_heads, cfg.dropout, cfg.drop_path)

    def encode(self, features: torch.Tensor, valid: torch.Tensor,
               coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """H (B,M,d) and prototypes after the cross-attention blocks (B,K,d)."""
        h = self.proj(features)
        if self.spatial is not None:
            if coords is None:
                raise ValueError("model.spatial_context 'neighbours' needs the patches' coords "
                                 "(Batch.coords, read from the bags' 'coords' dataset)")
            h = self.spatial(h, coords, valid)
        p = self.prototypes(valid)
        if self.blocks is not None:
            keys = safe_key_mask(valid)
            for block in self.blocks:
                p = block(p, h, keys)
        else:
            p = p + self.pool_norm(self.pool_proj(masked_mean(h, valid))).unsqueeze(1)
        return h, p

    def forward(self, features: torch.Tensor, valid: torch.Tensor, coords: torch.Tensor | None = None):
        """Returns tokens [t_p; P] after self-attention (B,1+K,d), H and the prototypes P."""
        h, p = self.encode(features, valid, coords)
        tokens = self.self_attn(torch.cat([self.cls(valid), p], dim=1))
        return tokens, h, p


class GenomicEncoder(nn.Module):
    """Gene groups -> one SNN each -> N tokens; [t_g; G] -> two self-attention layers."""

    def __init__(self, group_sizes: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.group_sizes = tuple(group_sizes)
        self.snns = nn.ModuleList(SNNBlock(g, d, cfg.dropout) for g in group_sizes)
        self.cls = LearnedTokens(1, d)
        self.layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.n_heads, cfg.dropout, cfg.drop_path) for _ in range(2)
        )

    def forward(self, genomics: torch.Tensor) -> torch.Tensor:
        """(B, G) -> tokens [t_g; G] (B, 1+N, d)."""
        groups = split_groups(genomics, self.group_sizes)
        g = torch.stack([snn(x) for snn, x in zip(self.snns, groups)], dim=1)
        x = torch.cat([self.cls(genomics.detach()), g], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


@register_model("umeml")
class UMEML(nn.Module):
    """Unified multimodal model with prototypes, registers and the modularity loss.

    ``forward(features (B,M,D), patch_mask (B,M), genomics (B,G), has_path (B,), has_genomics (B,),
    coords (B,M,2) | None)`` -> :class:`ModelOutput` with ``aux_loss = gamma * L_mod`` per bag;
    ``coords`` is read only with ``spatial_context="neighbours"``.
    """

    supports_spatial_context = True  # reads coords with cfg.spatial_context (umeml/model/spatial.py)

    def __init__(self, cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.use_path = "pathology" in cfg.modalities
        self.use_gen = "genomics" in cfg.modalities
        if self.use_path:
            if feature_dim < 1:
                raise ValueError("umeml with pathology needs feature_dim >= 1")
            self.path = PathologyEncoder(feature_dim, cfg)
            self.missing_path = LearnedTokens(1 + cfg.n_prototypes, d)
        if self.use_gen:
            if not group_sizes:
                raise ValueError("umeml with genomics needs at least one gene group")
            self.gen = GenomicEncoder(group_sizes, cfg)
            self.missing_gen = LearnedTokens(1 + len(group_sizes), d)
        self.n_registers = cfg.n_registers if cfg.use_registers else 0
        self.registers = LearnedTokens(self.n_registers, d) if self.n_registers else None
        self.decoder = nn.ModuleList(
            SelfAttentionLayer(d, cfg.n_heads, cfg.dropout, cfg.drop_path) for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        if self.use_path and self.use_gen:
            if cfg.fusion == "bilinear":
                self.fusion = BilinearFusion(d, rank=min(d, 32), drop=cfg.dropout)
            else:
                self.fusion = ConcatFusion([d, d], d, cfg.dropout)
        else:
            self.fusion = ConcatFusion([d], d, cfg.dropout)
        self.heads = TaskHeads(d, heads, cfg.survival_head)
        self.use_modularity = cfg.use_modularity and self.use_path

    def compute_modularity(self, hn, s_p, s_g, beta, valid) -> torch.Tensor:
        """Per-bag L_mod from unit-norm patches ``hn``; a method so that a benchmark can swap in
        another implementation."""
        return modularity_loss(
            hn,
            s_p,
            s_g,
            alpha=self.cfg.modularity_alpha,
            beta=beta,
            mask=valid,
            block=self.cfg.modularity_block,
            max_patches=self.cfg.modularity_max_patches if self.training else None,
            normalized=True,
        )

    def forward(self, features, patch_mask, genomics, has_path, has_genomics, coords=None) -> ModelOutput:
        """See the class docstring; B may be 0."""
        cfg = self.cfg
        ref = has_path  # any (B,) tensor: tells the token modules the batch size
        seq = []
        if self.use_path:
            features, patch_mask, coords = ensure_patch_axis(features, patch_mask, coords)
            valid = patch_mask.bool() & has_path.bool()[:, None]
            path_ok = valid.any(dim=1)
            tp, h, p = self.path(features, valid, coords)
            tp = torch.where(path_ok[:, None, None], tp, self.missing_path(ref))
            seq.append(tp)
        if self.registers is not None:
            seq.append(self.registers(ref))
        if self.use_gen:
            tg = self.gen(genomics)
            gene_tokens = tg[:, 1:]
            tg = torch.where(has_genomics.bool()[:, None, None], tg, self.missing_gen(ref))
            g_start = sum(t.shape[1] for t in seq)
            seq.append(tg)
        x = torch.cat(seq, dim=1)
        for layer in self.decoder:
            x = layer(x)
        x = self.norm(x)
        reps = []
        if self.use_path:
            reps.append(x[:, 0])
        if self.use_gen:
            reps.append(x[:, g_start])
        logits = self.heads(self.fusion(*reps))

        aux = x.new_zeros(x.shape[0])
        if self.use_modularity and cfg.gamma > 0:
            # one normalised copy of the (detached) patches serves both assignments and the graph
            hn = F.normalize(h.detach(), dim=-1)
            s_p = soft_assignments(hn, p, cfg.tau, valid, normalized=True)
            s_g, beta = None, 0.0
            if self.use_gen:
                s_g = soft_assignments(hn, gene_tokens, cfg.tau, valid, normalized=True)
                beta = cfg.modularity_beta * has_genomics.to(hn.dtype)
            aux = cfg.gamma * self.compute_modularity(hn, s_p, s_g, beta, valid)
        return ModelOutput(logits=logits, aux_loss=aux)

    def patch_assignments(self, features: torch.Tensor, patch_mask: torch.Tensor,
                          coords: torch.Tensor | None = None) -> torch.Tensor:
        """Soft assignment S^p (B, K, M) of every patch to the K prototypes (for heatmaps).

        Padded patches get all-zero columns. Call under ``torch.no_grad()`` for inference.
        ``coords`` (B, M, 2) is needed with ``spatial_context="neighbours"``.
        """
        if not self.use_path:
            raise ValueError("this UMEML model has no pathology branch")
        features, patch_mask, coords = ensure_patch_axis(features, patch_mask, coords)
        valid = patch_mask.bool()
        h, p = self.path.encode(features, valid, coords)
        return soft_assignments(h, p, self.cfg.tau, valid)

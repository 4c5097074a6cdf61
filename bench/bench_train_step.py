"""Benchmark: one UMEML training step (forward + backward + AdamW step) on one bag.

Paper-size model (d = 256, K = 5 prototypes, R = 3 registers, N = 6 MCAT gene groups with the
gene counts of ``shared/data/tcga_gbmlgg/signatures.csv``), M = 4096 patches of D = 512 features,
three task heads, the exact full-bag modularity loss (no patch subsampling), dropout on.

For comparison the same model (same weights) is rebuilt *inside this script* with every
attention module replaced by ``nn.MultiheadAttention`` (default ``need_weights=True``, as most
MIL code calls it) and the modularity loss replaced by the dense M x M formula. Both variants run
in this process, alternately, and the ratio of their best-of-N step times is printed.

Usage: python -m bench.bench_train_step [--patches 4096] [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from umeml.config import ModelConfig
from umeml.data.batch import Batch
from umeml.model import build_model, dense_modularity_loss
from umeml.model.blocks import Attention
from umeml.train.losses import task_loss

GROUP_SIZES = (82, 328, 513, 452, 1536, 452)  # MCAT signatures (genes per group)
HEADS = {"grade": 3, "subtype": 6, "survival": 4}


class MHAAttention(nn.Module):
    """Drop-in for :class:`Attention` built on ``nn.MultiheadAttention`` (comparison only)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, n_heads, batch_first=True)

    def forward(self, query, context, key_mask=None):
        out, _ = self.mha(query, context, context, key_padding_mask=None if key_mask is None else ~key_mask)
        return out


def mha_dense_variant(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Copy of ``model`` with nn.MultiheadAttention everywhere and the dense modularity loss."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, name, MHAAttention(cfg.hidden_dim, cfg.n_heads))

    def dense(h, s_p, s_g, beta, valid):
        return dense_modularity_loss(h, s_p, s_g, alpha=cfg.modularity_alpha, beta=beta, mask=valid)

    ref.compute_modularity = dense
    return ref


def make_batch(m: int, d: int) -> Batch:
    """One bag of ``m`` random patches of ``d`` features, with genomics and every label (seeded)."""
    g = torch.Generator().manual_seed(0)
    return Batch(
        features=torch.randn(1, m, d, generator=g),
        patch_mask=torch.ones(1, m, dtype=torch.bool),
        genomics=torch.randn(1, sum(GROUP_SIZES), generator=g),
        has_path=torch.ones(1, dtype=torch.bool),
        has_genomics=torch.ones(1, dtype=torch.bool),
        grade=torch.tensor([1]),
        subtype=torch.tensor([2]),
        survival_bin=torch.tensor([1]),
        survival_months=torch.tensor([12.0]),
        censorship=torch.tensor([0]),
    )


def step_fn(model: nn.Module, batch: Batch):
    """A closure doing one AdamW training step of ``model`` on ``batch``; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = task_loss(model(*batch.model_inputs()), batch, tuple(HEADS), {}, 0.15).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> int:
    """Time both variants and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=4096)
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig()  # paper defaults: d=256, K=5, R=3, dropout 0.25, drop_path 0.1
    model = build_model(cfg, args.feature_dim, GROUP_SIZES, HEADS)
    reference = mha_dense_variant(model, cfg)
    batch = make_batch(args.patches, args.feature_dim)
    n_params = sum(p.numel() for p in model.parameters())
    steps = {"umeml (SDPA + blockwise loss)": step_fn(model, batch),
             "nn.MultiheadAttention + dense loss": step_fn(reference, batch)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.steps):  # alternate so that machine load hits both alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    print(f"# train step, M={args.patches}, D={args.feature_dim}, d={cfg.hidden_dim}, K={cfg.n_prototypes}, "
          f"R={cfg.n_registers}, N={len(GROUP_SIZES)}, params={n_params / 1e6:.2f}M, threads={args.threads}, steps={args.steps}")
    print("| variant | best (s/bag) | median (s/bag) |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.3f} | {statistics.median(ts):.3f} |")
    ours, ref = (times[k] for k in steps)
    print(f"\nspeed-up vs nn.MultiheadAttention + dense loss: best {min(ref) / min(ours):.1f}x, "
          f"median {statistics.median(ref) / statistics.median(ours):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

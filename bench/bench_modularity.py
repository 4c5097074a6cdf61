"""Benchmark: blockwise vs dense modularity loss (exact paper formula), time and peak memory.

Memory: each (implementation, M) runs once in a fresh subprocess. Peak extra memory = the
process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` just before
the call) minus its resident size right before the call. It counts everything the process really
touched -- forward, backward and the autograd graph; PyTorch's CPU allocator hands large blocks
back to the OS, so this is the true high-water mark (tracemalloc would not see torch's buffers).

Time: for each M one subprocess alternates blockwise and dense calls (after one warm-up call of
each), so both see the same machine load; the table gives the best (minimum) and the median of
``--repeats`` calls. On a machine shared with other jobs the best is the least disturbed figure.

The measured work is what the model does per bag: normalise the patches once, soft-assign them
to K = 5 prototypes and N = 6 gene tokens (cosine, softmax over tokens), the loss, backward. As
in the model, patch embeddings are detached (gradients go to prototypes and gene tokens);
``--grad-h`` also back-propagates into the patch embeddings through the affinity matrix.

Usage: python -m bench.bench_modularity [--sizes 4096 16384 65536] [--dense-max 16384]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from bench._harness import WORKER_FLAG, emit, peak_extra, run_worker


def _setup(m: int, threads: int, grad_h: bool):
    """Inputs and a ``step(impl, block)`` closure doing soft assignments + loss + backward."""
    import torch

    from umeml.model.modularity import dense_modularity_loss, modularity_loss, soft_assignments

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d, k, n = 256, 5, 6
    h = torch.randn(1, m, d).requires_grad_(grad_h)
    protos = torch.randn(1, k, d, requires_grad=True)
    genes = torch.randn(1, n, d, requires_grad=True)

    def step(impl: str, block: int) -> float:
        protos.grad = genes.grad = h.grad = None
        hn = torch.nn.functional.normalize(h, dim=-1)  # one copy serves everything, as in UMEML
        s_p = soft_assignments(hn, protos, 1.0, normalized=True)
        s_g = soft_assignments(hn, genes, 1.0, normalized=True)
        if impl == "dense":
            loss = dense_modularity_loss(hn, s_p, s_g)
        else:
            loss = modularity_loss(hn, s_p, s_g, block=block, normalized=True)
        loss.sum().backward()
        return float(loss.detach())

    return step


def memory_worker(impl: str, m: int, block: int, threads: int, grad_h: bool) -> dict:
    """Peak extra RSS of one cold call of ``impl`` at size ``m``."""
    step = _setup(m, threads, grad_h)
    peak, loss = peak_extra(lambda: step(impl, block))
    return {"impl": impl, "m": m, "peak_mb": peak / 2**20, "loss": loss}


def time_worker(m: int, block: int, threads: int, grad_h: bool, repeats: int, dense: bool) -> dict:
    """Alternating timed calls of both implementations at size ``m``."""
    step = _setup(m, threads, grad_h)
    impls = ["blockwise"] + (["dense"] if dense else [])
    times: dict[str, list[float]] = {i: [] for i in impls}
    for impl in impls:
        step(impl, block)  # warm-up
    for _ in range(repeats):
        for impl in impls:
            t0 = time.perf_counter()
            step(impl, block)
            times[impl].append(time.perf_counter() - t0)
    return {i: {"best": min(t), "median": statistics.median(t)} for i, t in times.items()}


def _sub(args, *worker: str) -> dict:
    options = ["--block", str(args.block), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--dense-max", str(args.dense_max)] + (["--grad-h"] if args.grad_h else [])
    return run_worker(__spec__.name, *options, WORKER_FLAG, *worker)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and print a markdown table with blockwise/dense ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--dense-max", type=int, default=16384, help="largest M for the dense formula")
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-h", action="store_true", help="also back-propagate into the patch embeddings")
    p.add_argument(WORKER_FLAG, nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "mem":
            res = memory_worker(rest[0], int(rest[1]), args.block, args.threads, args.grad_h)
        else:
            m = int(rest[0])
            res = time_worker(m, args.block, args.threads, args.grad_h, args.repeats, m <= args.dense_max)
        return emit(res)

    print(f"# modularity loss, d=256, K=5, N=6, block={args.block}, threads={args.threads}, "
          f"grad_h={args.grad_h}, repeats={args.repeats}, {platform.machine()}")
    print("| M | blockwise s (best / median) | blockwise peak extra MB | dense s (best / median) "
          "| dense peak extra MB | speed-up (best / median) | memory ratio | loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.sizes:
        dense = m <= args.dense_max
        t = _sub(args, "time", str(m))
        mem_b = _sub(args, "mem", "blockwise", str(m))
        b = t["blockwise"]
        row = f"| {m} | {b['best']:.3f} / {b['median']:.3f} | {mem_b['peak_mb']:.0f} "
        if dense:
            mem_d = _sub(args, "mem", "dense", str(m))
            d = t["dense"]
            row += (f"| {d['best']:.3f} / {d['median']:.3f} | {mem_d['peak_mb']:.0f} "
                    f"| {d['best'] / b['best']:.1f}x / {d['median'] / b['median']:.1f}x "
                    f"| {mem_d['peak_mb'] / max(mem_b['peak_mb'], 1e-9):.0f}x "
                    f"| {abs(mem_b['loss'] - mem_d['loss']):.1e} |")
        else:
            row += "| - | - | - | - | - |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

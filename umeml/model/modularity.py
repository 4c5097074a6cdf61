"""The modularity loss of UMEML (design section 5, item 3) in memory linear in the bag size.

For one bag with M patches (rows of ``h``) and soft assignments ``S`` (C x M):

- ``A_ij = max(0, cos(h_i, h_j))`` for i != j, ``A_ii = 0`` (padded patches have no edges);
- degrees ``d = A 1``, ``2e = 1^T A 1``, ``W = A - d d^T / 2e``;
- ``Tr(S W S^T) = Tr(S A S^T) - ||S d||^2 / 2e``;
- ``L_mod = -(1/2e) (alpha Tr(S^p W S^p^T) + beta Tr(S^g W S^g^T))``.

Both traces share A, so they are computed in one pass with the stacked assignments
``[sqrt(alpha) S^p; sqrt(beta) S^g]`` (exactly the weighted sum of the two traces).

The blockwise version never forms an M x M matrix: it visits the upper triangle of A in
``block x block`` tiles (A is symmetric, so each tile serves both its rows and its columns) and
accumulates ``S A`` and ``d`` (C+1 numbers per patch). Its backward pass is analytic
(:class:`_BlockModularity`): the gradient w.r.t. S needs only the saved ``S A``, ``d`` and
``S d`` (O(M C)); the gradient w.r.t. the patch embeddings, when they require it, revisits the
tiles once more. Peak memory is O(M (C + d) + block^2), forward and backward.

A bag with fewer than two real patches, or whose patches are pairwise non-positive (2e = 0),
has no graph: its loss is 0 with zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dense_modularity_loss",
    "modularity_loss",
    "soft_assignments",
    "subsample_patches",
]


def soft_assignments(
    h: torch.Tensor,
    tokens: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """Soft assignment of patches to tokens: softmax over tokens of cos(h_i, t_k) / tau.

    ``h`` (B, M, d) patches, ``tokens`` (B, K, d) -> (B, K, M); columns of padded patches are 0.
    ``normalized=True`` says the rows of ``h`` already have unit norm (saves an M x d copy;
    sharing one normalised tensor between calls lets autograd keep it once).
    """
    hn = h if normalized else F.normalize(h, dim=-1)
    cos = F.normalize(tokens, dim=-1) @ hn.transpose(1, 2)  # (B, K, M)
    s = torch.softmax(cos / tau, dim=1)
    if mask is not None:
        s = s * mask.unsqueeze(1).to(s.dtype)
    return s


def subsample_patches(
    mask: torch.Tensor, max_patches: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (B, min(M, max_patches)) of a uniform random subset of each bag's real patches.

    Real patches are drawn first (random order); a bag with fewer real patches than
    ``max_patches`` keeps all of them, followed by padding positions (still masked out).
    """
    b, m = mask.shape
    k = min(m, max_patches)
    keys = torch.rand(b, m, generator=generator, device=mask.device)
    keys = keys + (~mask).to(keys.dtype) * 2.0  # padded positions sort after every real one
    return keys.topk(k, dim=1, largest=False).indices


def _stack_assignments(
    s_p: torch.Tensor | None,
    s_g: torch.Tensor | None,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """``[sqrt(alpha) S^p; sqrt(beta) S^g]`` (B, C, M); alpha/beta may be floats or (B,) tensors."""
    parts = []
    for s, w in ((s_p, alpha), (s_g, beta)):
        if s is None:
            continue
        w = torch.as_tensor(w, dtype=s.dtype, device=s.device)
        if bool((w < 0).any()):
            raise ValueError("modularity weights alpha and beta must be >= 0")
        w = w.reshape(-1, 1, 1) if w.ndim == 1 else w
        parts.append(s * w.sqrt())
    if not parts:
        raise ValueError("modularity_loss: give s_p, s_g or both")
    return torch.cat(parts, dim=1)


def _check_inputs(h: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if h.ndim != 3 or s.ndim != 3 or s.shape[0] != h.shape[0] or s.shape[2] != h.shape[1]:
        raise ValueError(f"expected h (B,M,d) and assignments (B,C,M); got {tuple(h.shape)}, {tuple(s.shape)}")
    if mask is None:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if mask.shape != h.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match h {tuple(h.shape[:2])}")
    return mask.bool()


def _tiles(m: int, block: int):
    """Upper-triangular tiles (i0, i1, j0, j1) of an m x m matrix, j0 >= i0."""
    for i0 in range(0, m, block):
        i1 = min(i0 + block, m)
        for j0 in range(i0, m, block):
            yield i0, i1, j0, min(j0 + block, m)


class _BlockModularity(torch.autograd.Function):
    """``-(Tr(S A S^T) - ||S d||^2 / 2e) / 2e`` per bag, tiled, with an analytic backward.

    Inputs: ``x`` (B, M, d) unit-norm patch embeddings, ``s`` (B, C, M), ``mask`` (B, M) bool,
    ``block`` int. Output (B,). Autograd keeps no tile: backward recomputes what it needs.
    """

    @staticmethod
    def forward(ctx, x, s, mask, block):  # noqa: D401 - autograd signature
        bsz, c = s.shape[0], s.shape[1]
        out = x.new_zeros(bsz)
        saved = []
        for b in range(bsz):
            idx = mask[b].nonzero().squeeze(1)
            m = idx.numel()
            if m < 2:
                saved.append(None)
                continue
            full = m == x.shape[1]
            xb = x[b] if full else x[b].index_select(0, idx)
            sb = s[b] if full else s[b].index_select(1, idx)
            s1 = torch.cat([sb, sb.new_ones(1, m)], dim=0)  # last row of ones gives the degrees
            acc = sb.new_zeros(c + 1, m)  # [S A; d]
            for i0, i1, j0, j1 in _tiles(m, block):
                a = xb[i0:i1] @ xb[j0:j1].T
                a.clamp_(min=0.0)
                if i0 == j0:
                    a.diagonal().zero_()
                acc[:, i0:i1] += s1[:, j0:j1] @ a.T
                if j0 != i0:  # the mirrored tile A_ji = A_ij^T
                    acc[:, j0:j1] += s1[:, i0:i1] @ a
            sa, deg = acc[:c], acc[c]
            two_e = deg.sum()
            if not bool(two_e > 0):
                saved.append(None)
                continue
            u = sb @ deg
            t1 = (sa * sb).sum()
            out[b] = -(t1 - u.dot(u) / two_e) / two_e
            saved.append((idx, full, sa, deg, u, two_e, t1))
        ctx.saved = saved
        ctx.block = block
        ctx.s_shape = s.shape
        # x and s are needed again only for the gradient w.r.t. x (the tile pass); the gradient
        # w.r.t. s uses the saved O(M C) summaries alone.
        ctx.save_for_backward(*((x, s) if ctx.needs_input_grad[0] else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x, s = ctx.saved_tensors if need_x else (None, None)
        gx = torch.zeros_like(x) if need_x else None
        gs = grad_out.new_zeros(ctx.s_shape) if need_s else None
        for b, item in enumerate(ctx.saved):
            if item is None:
                continue
            idx, full, sa, deg, u, two_e, t1 = item
            go = grad_out[b]
            if need_s:
                # dL/dS = -2 S A / 2e + 2 (S d) d^T / (2e)^2
                g = go * (-2.0 * sa / two_e + 2.0 * torch.outer(u, deg) / two_e**2)
                if full:
                    gs[b] = g
                else:
                    gs[b].index_copy_(1, idx, g)
            if need_x:
                sb = s[b] if full else s[b].index_select(1, idx)
                gx_b = _x_grad(x[b] if full else x[b].index_select(0, idx), sb, u, two_e, t1, ctx.block)
                gx_b = gx_b * go
                if full:
                    gx[b] = gx_b
                else:
                    gx[b].index_copy_(0, idx, gx_b)
        return gx, gs, None, None


def _x_grad(xb, sb, u, two_e, t1, block):
    """Gradient of one bag's loss w.r.t. its unit embeddings, tile by tile.

    With L = -T1/E + ||u||^2/E^2 (E = 2e, u = S d, T1 = Tr(S A S^T)):
    dL/dA_ij = -s_i.s_j/E + c0 + c_i with c0 = T1/E^2 - 2||u||^2/E^3, c_i = 2 u.s_i/E^2;
    A_ij = relu(x_i.x_j) (i != j), so dL/dX = Q X with the symmetric
    Q_ij = [x_i.x_j > 0, i != j] (-2 s_i.s_j/E + 2 c0 + c_i + c_j).
    """
    m = xb.shape[0]
    c0 = t1 / two_e**2 - 2.0 * u.dot(u) / two_e**3
    cv = 2.0 * (u @ sb) / two_e**2  # (m,)
    g = torch.zeros_like(xb)
    for i0, i1, j0, j1 in _tiles(m, block):
        a = xb[i0:i1] @ xb[j0:j1].T
        q = (-2.0 / two_e) * (sb[:, i0:i1].T @ sb[:, j0:j1])
        q += 2.0 * c0 + cv[i0:i1, None] + cv[None, j0:j1]
        q *= a > 0
        if i0 == j0:
            q.diagonal().zero_()
        g[i0:i1] += q @ xb[j0:j1]
        if j0 != i0:
            g[j0:j1] += q.T @ xb[i0:i1]
    return g


def modularity_loss(
    h: torch.Tensor,
    s_p: torch.Tensor | None,
    s_g: torch.Tensor | None = None,
    *,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    block: int = 1024,
    max_patches: int | None = None,
    generator: torch.Generator | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """Per-bag L_mod (B,) of design 5.3, exact, without M x M matrices.

    Args:
        h: (B, M, d) patch embeddings; the affinity uses their cosine similarity. Gradients flow
            to ``h`` through A if it requires grad (the UMEML model passes it detached).
        s_p: (B, K, M) soft assignments to pathology prototypes, or None.
        s_g: (B, N, M) soft assignments to gene tokens, or None.
        alpha, beta: weights of the two traces; floats or (B,) tensors (a per-bag 0 switches a
            term off, e.g. beta for a patient without genomics).
        mask: (B, M) bool, True for real patches; padded positions take no part.
        block: tile size; memory is O(M (C + d) + block^2).
        max_patches: if set, each bag's loss uses a uniform random subset of at most this many
            real patches (same subset for A and S).
        generator: random generator for the subsampling.
        normalized: the rows of ``h`` already have unit norm (skips an M x d copy).
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    s = _stack_assignments(s_p, s_g, alpha, beta, h.shape[0])
    mask = _check_inputs(h, s, mask)
    if max_patches is not None and h.shape[1] > max_patches:
        idx = subsample_patches(mask, max_patches, generator)
        h = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[2]))
        s = s.gather(2, idx.unsqueeze(1).expand(-1, s.shape[1], -1))
        mask = mask.gather(1, idx)
    # at least float32 and no autocast: 2e grows like M^2 and would overflow float16
    dtype = torch.promote_types(torch.promote_types(h.dtype, s.dtype), torch.float32)
    with torch.autocast(device_type=h.device.type, enabled=False):
        x = h.to(dtype) if normalized else F.normalize(h.to(dtype), dim=-1)
        return _BlockModularity.apply(x, s.to(dtype), mask, int(block))


def dense_modularity_loss(
    h: torch.Tensor,
    s_p: torch.Tensor | None,
    s_g: torch.Tensor | None = None,
    *,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference L_mod (B,) with the M x M matrices A and W built explicitly (plain autograd).

    The textbook formula, for tests and benchmarks; O(M^2) memory.
    """
    s = _stack_assignments(s_p, s_g, alpha, beta, h.shape[0])
    mask = _check_inputs(h, s, mask)
    x = F.normalize(h, dim=-1)
    a = torch.relu(x @ x.transpose(1, 2))
    # zero diagonal and every pair that involves a padded patch, in one masked pass
    keep = mask.unsqueeze(1) & mask.unsqueeze(2)
    keep = keep & ~torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
    a = a.masked_fill(~keep, 0.0)
    s = s * mask.unsqueeze(1).to(s.dtype)
    deg = a.sum(dim=2, keepdim=True)  # (B, M, 1)
    two_e = deg.sum(dim=(1, 2))  # (B,)
    safe = torch.where(two_e > 0, two_e, torch.ones_like(two_e))
    w = a - deg @ deg.transpose(1, 2) / safe.reshape(-1, 1, 1)
    trace = torch.diagonal(s @ w @ s.transpose(1, 2), dim1=1, dim2=2).sum(-1)
    return torch.where(two_e > 0, -trace / safe, torch.zeros_like(trace))

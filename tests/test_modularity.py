"""The blockwise modularity loss equals the dense formula (value and gradients)."""

from __future__ import annotations

import pytest
import torch

from umeml.model.modularity import (
    dense_modularity_loss,
    modularity_loss,
    soft_assignments,
    subsample_patches,
)

DT = torch.float64


def inputs(b=3, m=23, d=6, k=4, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, m, d, generator=g, dtype=DT).requires_grad_()
    s_p = torch.softmax(torch.randn(b, k, m, generator=g, dtype=DT), 1).requires_grad_()
    s_g = torch.softmax(torch.randn(b, n, m, generator=g, dtype=DT), 1).requires_grad_()
    mask = torch.ones(b, m, dtype=torch.bool)
    if b > 1:
        mask[1, (2 * m) // 3 :] = False  # padded bag
    if b > 2:
        mask[2, ::3] = False  # holes in the middle
    return h, s_p, s_g, mask


def hand_loss(h, s, mask):
    """The formula written out for one bag, straight from design 5.3 (loops over entries)."""
    idx = mask.nonzero().squeeze(1)
    x = torch.nn.functional.normalize(h[idx].detach(), dim=-1)
    s = s[:, idx].detach()
    m = len(idx)
    a = torch.zeros(m, m, dtype=h.dtype)
    for i in range(m):
        for j in range(m):
            if i != j:
                a[i, j] = max(0.0, float(x[i] @ x[j]))
    deg = a.sum(1)
    two_e = deg.sum()
    w = a - torch.outer(deg, deg) / two_e
    return -torch.trace(s @ w @ s.T) / two_e


def test_dense_reference_matches_hand_formula():
    h, s_p, _, mask = inputs(b=2, m=9)
    dense = dense_modularity_loss(h, s_p, None, mask=mask)
    for b in range(2):
        torch.testing.assert_close(dense[b], hand_loss(h[b], s_p[b], mask[b]))


@pytest.mark.parametrize("block", [1, 4, 7, 23, 64])
def test_blockwise_equals_dense_value_and_grads(block):
    h, s_p, s_g, mask = inputs()
    beta = torch.tensor([1.0, 0.5, 0.0], dtype=DT)  # a zero beta switches the genomic term off
    kw = dict(alpha=0.7, beta=beta, mask=mask)
    fast = modularity_loss(h, s_p, s_g, block=block, **kw)
    ref = dense_modularity_loss(h, s_p, s_g, **kw)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=DT)
    g_fast = torch.autograd.grad((fast * weights).sum(), (h, s_p, s_g))
    g_ref = torch.autograd.grad((ref * weights).sum(), (h, s_p, s_g))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_float32_within_1e5_of_dense():
    h, s_p, s_g, mask = inputs(m=50, d=16)
    h32, sp32, sg32 = (t.detach().float().requires_grad_() for t in (h, s_p, s_g))
    fast = modularity_loss(h32, sp32, sg32, mask=mask, block=16)
    ref = dense_modularity_loss(h32, sp32, sg32, mask=mask)
    assert (fast - ref).abs().max() < 1e-5
    ga = torch.autograd.grad(fast.sum(), (h32, sp32))
    gb = torch.autograd.grad(ref.sum(), (h32, sp32))
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() < 1e-5


def test_gradcheck_blockwise():
    h, s_p, _, mask = inputs(b=2, m=8, d=3, k=2)
    assert torch.autograd.gradcheck(
        lambda hh, ss: modularity_loss(hh, ss, None, mask=mask, block=3), (h, s_p)
    )


def test_padding_does_not_change_the_loss():
    h, s_p, s_g, _ = inputs(b=1, m=10)
    short = modularity_loss(h, s_p, s_g, block=4)
    pad = torch.zeros(1, 5, h.shape[2], dtype=DT)
    h_pad = torch.cat([h.detach(), pad], 1)
    sp_pad = torch.cat([s_p.detach(), torch.rand(1, s_p.shape[1], 5, dtype=DT)], 2)
    sg_pad = torch.cat([s_g.detach(), torch.rand(1, s_g.shape[1], 5, dtype=DT)], 2)
    mask = torch.tensor([[True] * 10 + [False] * 5])
    torch.testing.assert_close(modularity_loss(h_pad, sp_pad, sg_pad, mask=mask, block=4), short.detach())


def test_degenerate_bags_give_zero():
    h, s_p, _, _ = inputs(b=3, m=5)
    mask = torch.tensor([[False] * 5, [True] + [False] * 4, [True] * 5])
    loss = modularity_loss(h, s_p, None, mask=mask)
    assert loss[0] == 0 and loss[1] == 0 and loss[2] != 0
    loss.sum().backward()
    assert torch.isfinite(h.grad).all()
    empty = modularity_loss(h[:0], s_p[:0], None)
    assert empty.shape == (0,)


def test_weights_match_separate_traces():
    h, s_p, s_g, mask = inputs()
    both = modularity_loss(h, s_p, s_g, alpha=2.0, beta=0.5, mask=mask)
    only_p = modularity_loss(h, s_p, None, alpha=1.0, mask=mask)
    only_g = modularity_loss(h, s_g, None, alpha=1.0, mask=mask)
    torch.testing.assert_close(both, 2.0 * only_p + 0.5 * only_g)


def test_subsampling_uses_only_real_patches():
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :25] = True
    mask[1, :4] = True
    idx = subsample_patches(mask, 10, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 10)
    assert mask.gather(1, idx)[0].all()  # 25 real: all 10 drawn are real
    assert mask.gather(1, idx)[1].sum() == 4  # 4 real: all kept
    assert len(set(idx[0].tolist())) == 10
    h, s_p, _, _ = inputs(b=2, m=30)
    full = modularity_loss(h, s_p, None, mask=mask)
    sub = modularity_loss(h, s_p, None, mask=mask, max_patches=10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sub).all()
    torch.testing.assert_close(sub[1], full[1])  # bag with 4 patches is unaffected


def test_soft_assignments():
    h, _, _, mask = inputs(b=2, m=6)
    tokens = torch.randn(2, 3, h.shape[2], dtype=DT)
    s = soft_assignments(h, tokens, tau=0.5, mask=mask[:2])
    torch.testing.assert_close(s.sum(1), mask[:2].to(DT))
    cos = torch.nn.functional.cosine_similarity(h[0, 0], tokens[0, 1], dim=0)
    logits = torch.stack([torch.nn.functional.cosine_similarity(h[0, 0], tokens[0, k], dim=0) for k in range(3)]) / 0.5
    torch.testing.assert_close(s[0, 1, 0], torch.softmax(logits, 0)[1])
    assert cos.abs() <= 1

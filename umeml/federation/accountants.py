"""Privacy accountants by name (``dp.accountant``), each one registration.

An accountant turns the composition of DP releases, ``(noise_multiplier, sample_rate, steps)``
with ``steps > 0`` and ``sample_rate <= 1``, into epsilon at ``delta``. Config validation
accepts exactly the registered names; :func:`umeml.federation.privacy.compute_epsilon` looks
them up. NumPy and Opacus are imported only when an accountant runs (config validation, which
reads the names, stays light).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable

from umeml.registry import Registry

__all__ = ["ACCOUNTANTS", "available_accountants", "register_accountant", "total_epsilon"]

History = list[tuple[float, float, int]]
ACCOUNTANTS: Registry[Callable[[History, float], float]] = Registry("accountant")


def register_accountant(name: str) -> Callable:
    """Decorator registering an accountant ``(history, delta) -> epsilon`` under ``name``
    (a duplicate name raises ``ValueError``)."""
    return ACCOUNTANTS.register(name)


def available_accountants() -> tuple[str, ...]:
    """Names of the registered accountants, sorted."""
    return ACCOUNTANTS.names()


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step of the sampled Gaussian mechanism at Opacus's default orders (cached:
    RDP composes additively, so k steps cost k times this)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                             orders=RDPAccountant.DEFAULT_ALPHAS).tolist())


@register_accountant("rdp")
def rdp_epsilon(history: History, delta: float) -> float:
    """Exactly what Opacus's ``RDPAccountant`` with this history reports (its per-step RDP is
    cached, so a bisection over the number of steps stays cheap)."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(k * np.asarray(_rdp_per_step(nm, q)) for nm, q, k in history)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@register_accountant("prv")
def prv_epsilon(history: History, delta: float) -> float:
    """Opacus's ``PRVAccountant`` (privacy random variables) over this history."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the optimal order is at the edge
        return float(acc.get_epsilon(delta))


def total_epsilon(history: History, pure_epsilons: list[float], delta: float) -> float:
    """One epsilon at ``delta`` for a site's every release, composed in Renyi DP (not summed).

    ``history`` holds the DP-SGD releases ``(noise_multiplier, sample_rate, steps)`` (sampled
    Gaussian, Opacus's RDP at its default orders); ``pure_epsilons`` the pure epsilon-DP
    releases (the survival histogram's discrete Laplace, delta 0), each of which is
    (alpha, min(eps, alpha eps^2 / 2))-RDP (eps-DP implies eps^2/2-zCDP, Bun & Steinke 2016).
    RDP adds over mechanisms at every order; Opacus's conversion gives epsilon at ``delta``.
    Basic composition (DP-SGD's epsilon at ``delta`` plus the pure epsilons) is also a valid
    bound and can be tighter when a pure release dominates; the smaller of the two is returned.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = np.zeros_like(orders)
    for nm, q, k in history:
        if int(k) > 0:
            rdp += int(k) * np.asarray(_rdp_per_step(float(nm), min(float(q), 1.0)))
    for eps in pure_epsilons:
        rdp += np.minimum(float(eps), orders * float(eps) ** 2 / 2.0)
    if not rdp.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the optimal order is at the edge
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    basic = (rdp_epsilon(list(history), delta) if any(int(k) > 0 for *_, k in history) else 0.0) + sum(pure_epsilons)
    return float(min(eps, basic))

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


def total_epsilon(history: History, pure_epsilons: list[float], delta: float, accountant: str = "rdp") -> float:
    """One epsilon at ``delta`` for a site's every release, composed in Renyi DP (not summed).

    ``history`` holds the Gaussian releases as ``(noise_multiplier, sample_rate, steps)``: the
    DP-SGD rounds (sampled Gaussian) and the one-off Gaussian releases (the class counts and the
    genomic moments, one step at sample rate 1, whose RDP alpha / (2 z^2) is exact); Opacus's RDP
    at its default orders. ``pure_epsilons`` are the pure epsilon-DP releases (the survival
    histogram's discrete Laplace, delta 0): an epsilon-DP mechanism is (alpha, eps)-RDP for
    every alpha (it is (inf, eps)-RDP, and Renyi divergence does not decrease with its order;
    Mironov 2017, "Renyi differential privacy", Sec. III) and (eps^2 / 2)-zCDP, i.e.
    (alpha, alpha eps^2 / 2)-RDP (Bun & Steinke 2016, "Concentrated differential privacy", Prop.
    1.4), so it costs min(eps, alpha eps^2 / 2) at order alpha. RDP adds over mechanisms at every
    order; Opacus's conversion (Balle et al. 2020) gives epsilon at ``delta`` once.
    Basic composition (the ``accountant``'s epsilon of ``history`` at ``delta`` plus the pure
    epsilons) is also a valid bound and can be tighter when a pure release dominates; the
    smaller of the two is returned. Without pure releases this is the accountant's epsilon.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    history = [(float(nm), min(float(q), 1.0), int(k)) for nm, q, k in history if int(k) > 0]
    pure_epsilons = [float(e) for e in pure_epsilons]
    gaussian = ACCOUNTANTS.get(accountant, "accountant")(history, delta) if history else 0.0
    if not pure_epsilons:
        return float(gaussian)
    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = np.zeros_like(orders)
    for nm, q, k in history:
        rdp += k * np.asarray(_rdp_per_step(nm, q))
    for eps in pure_epsilons:
        rdp += np.minimum(eps, orders * eps ** 2 / 2.0)
    if not rdp.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the optimal order is at the edge
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(min(eps, gaussian + sum(pure_epsilons)))

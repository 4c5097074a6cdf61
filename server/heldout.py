"""The held-out sites of a new deployment that names none: ``split.n_test_sites`` of the joined sites.

A simulation holds out ``split.test_sites``, or else ``split.n_test_sites`` sites chosen by seed
(:func:`umeml.data.splits.choose_held_out`). A deployment used to honour only ``test_sites`` and
``--held-out``: with the demo config (``n_test_sites: 1``) it held out no site, trained on all of
them and ended with an empty held-out table, while the same config simulated held one out. The
coordinator now applies the same rule to the sites that joined (those with patients), so that a
deployment and a simulation of the same sites and seed hold out the same site.
"""

from __future__ import annotations

from umeml.config import ExperimentConfig
from umeml.data.splits import choose_held_out
from umeml.errors import FederationError


def held_out_by_rule(cfg: ExperimentConfig, handshakes: dict[int, dict]) -> tuple[tuple[str, ...], str]:
    """``split.n_test_sites`` of the joined sites with patients, chosen by ``cfg.seed``, and a line
    saying so (``((), "")`` when ``n_test_sites`` is 0). A FederationError when no site would be left
    to train."""
    n = cfg.split.n_test_sites
    if n == 0:
        return (), ""
    joined = sorted(r["site"] for r in handshakes.values() if int(r.get("n_patients", 0)) > 0)
    try:
        held = choose_held_out(joined, n, cfg.seed)
    except ValueError as err:
        raise FederationError(f"split.n_test_sites={n}: {err} (joined with patients: {', '.join(joined) or 'none'}); "
                              "hold out fewer (split.n_test_sites), or name them (split.test_sites, --held-out)") from None
    return held, (f"held out by split.n_test_sites={n}: {', '.join(held)} (chosen by seed {cfg.seed} among "
                  f"{len(joined)} joined site(s); split.test_sites or --held-out name them instead)")

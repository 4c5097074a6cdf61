"""Privacy accounting and the privacy ledger (``privacy.json``), at a site and in the run dir.

The ledger *is* the accountant's state: every entry records the DP-SGD (or central DP) releases
of one round as ``(noise_multiplier, sample_rate, steps)``. Epsilon is recomputed from all
entries in scope with Opacus's accountants, so accounting spans every round of a run, resumed
runs and (with ``budget_scope: site``) every experiment that trained on the site's data.
Anyone can recompute an entry's epsilon from the recorded numbers.

One-off releases of aggregates (the survival histogram of federated preprocessing, made
epsilon-DP with two-sided geometric noise by :func:`discrete_laplace`; the class counts and
genomic moments of :mod:`umeml.federation.stats_release`) are recorded apart from the per-round
DP-SGD entries, under ``releases``. A site's budget (``dp.target_epsilon``) bounds the
composition of everything in its scope: the DP-SGD noise is calibrated for what the releases
leave (:func:`release_terms`, :func:`composed_epsilon`), and each entry records both the DP-SGD
epsilon alone (``epsilon``) and the total (``epsilon_total``).

Only these scalars ever leave a site; no patient-level value is in a ledger.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np

from umeml.federation.accountants import ACCOUNTANTS
from umeml.rundir import PRIVACY_FILE, atomic_write_json

LEDGER_FILE = PRIVACY_FILE
LEDGER_FORMAT = 1


def compute_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``(noise_multiplier, sample_rate, steps)`` releases.

    Entries with zero steps (a round without training) add nothing; no release gives 0.
    ``accountant`` is a name registered in :mod:`umeml.federation.accountants` (``rdp`` gives
    exactly what Opacus's ``RDPAccountant`` reports, ``prv`` uses Opacus's ``PRVAccountant``).
    """
    hist = [(float(nm), min(float(q), 1.0), int(k)) for nm, q, k in history if int(k) > 0]
    if not hist:
        return 0.0
    return ACCOUNTANTS.get(accountant, "accountant")(hist, delta)


def composed_epsilon(history: Iterable[tuple[float, float, int]], pure: Iterable[float], delta: float,
                     accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of Gaussian releases ``history`` together with the pure epsilon-DP
    releases ``pure`` (:func:`umeml.federation.accountants.total_epsilon`); without pure releases
    exactly :func:`compute_epsilon`."""
    from umeml.federation.accountants import total_epsilon

    pure = [float(e) for e in pure]
    if not pure:
        return compute_epsilon(history, delta, accountant)
    return total_epsilon(list(history), pure, delta, accountant)


def max_steps_within(history: list[tuple[float, float, int]], noise_multiplier: float, sample_rate: float,
                     planned: int, target_epsilon: float, delta: float, accountant: str = "rdp",
                     pure: Iterable[float] = ()) -> tuple[int, float]:
    """Largest ``k <= planned`` with epsilon(history + k steps, with the pure releases ``pure``)
    <= target, and that epsilon.

    Epsilon grows with the number of steps, so a bisection finds ``k``; when all planned steps
    fit, one evaluation suffices.
    """
    pure = list(pure)

    def eps(k: int) -> float:
        return composed_epsilon(list(history) + [(noise_multiplier, sample_rate, k)], pure, delta, accountant)

    if planned <= 0:
        return 0, eps(0)
    full = eps(planned)
    if full <= target_epsilon:
        return planned, full
    lo, lo_eps, hi = 0, eps(0), planned  # invariant: eps(lo) <= target < eps(hi)
    if lo_eps > target_epsilon:
        return 0, lo_eps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        e = eps(mid)
        if e <= target_epsilon:
            lo, lo_eps = mid, e
        else:
            hi = mid
    return lo, lo_eps


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    history: list[tuple[float, float, int]] = (), pure: Iterable[float] = ()) -> float | None:
    """Smallest noise multiplier (within 1 %) with which ``steps`` more steps at ``sample_rate``
    keep the total epsilon, ``history`` and the pure releases ``pure`` included, at or below
    ``target_epsilon``: the DP-SGD calibration leaves room for the one-off releases.

    None when ``history`` alone already reaches the target (nothing is left to spend).
    """
    history, pure = list(history), list(pure)
    if composed_epsilon(history, pure, delta, accountant) >= target_epsilon:
        return None

    def eps(sigma: float) -> float:
        return composed_epsilon(history + [(sigma, sample_rate, max(int(steps), 1))], pure, delta, accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > 1e4:
            return None
    lo = hi / 2.0 if hi > 1.0 else 0.0
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def discrete_laplace(shape, epsilon: float, rng=None):
    """Integer noise with P(k) proportional to exp(-epsilon |k|) (the two-sided geometric, or
    discrete Laplace, mechanism of scale 1/epsilon): added to counts whose L1 sensitivity is 1,
    it makes them epsilon-DP.

    Drawn as the difference of two geometric variables with success probability
    1 - exp(-epsilon). ``rng`` is for tests only: by default every call draws from a fresh
    generator seeded with 128 bits from the OS (``secrets``), never from the experiment's seed,
    which anyone reading the config could use to subtract the noise.
    """
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0 (got {epsilon!r})")
    if rng is None:
        rng = np.random.default_rng(secrets.randbits(128))
    p = -math.expm1(-float(epsilon))  # 1 - exp(-epsilon), accurate for small epsilon
    return (rng.geometric(p, size=shape) - rng.geometric(p, size=shape)).astype(np.int64)


HISTOGRAM_RELEASE = "survival_histogram"


def release_terms(releases: Iterable[dict]) -> tuple[list[tuple[float, float, int]], list[float]]:
    """The accountant's view of one-off releases: Gaussian ones (recorded with a noise multiplier:
    the class counts, the genomic moments) as ``(noise_multiplier, sample_rate, steps)``, pure
    epsilon-DP ones (the survival histogram) as their epsilons. Exact releases (epsilon None) are
    outside every epsilon and add nothing."""
    gaussian, pure = [], []
    for r in releases:
        if r.get("noise_multiplier") is not None:
            gaussian.append((float(r["noise_multiplier"]), float(r.get("sample_rate", 1.0)), int(r.get("steps", 1))))
        elif r.get("epsilon") is not None:
            pure.append(float(r["epsilon"]))
    return gaussian, pure


def counts_fingerprint(counts, *context) -> str:
    """SHA-256 of exact counts and their context (grid, epsilon): lets a site recognise a
    repeated request for the same release. Kept in the site's own ledger, never sent."""
    h = hashlib.sha256(np.asarray(counts, dtype=np.int64).tobytes())
    h.update(json.dumps([str(c) for c in context]).encode())
    return h.hexdigest()


class SiteLedger:
    """A site's own ledger, ``<state dir>/privacy.json``: every round it trained under DP
    (``entries``) and every survival histogram it released (``releases``).

    Entries are appended (never rewritten) after the round's training and before the update
    is sent, so a resumed run, a retried round or a new process continues the accounting.
    """

    def __init__(self, state_dir: str | Path, site_id: str):
        self.path = Path(state_dir) / LEDGER_FILE
        self.site_id = site_id

    def _raw(self) -> dict:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text())

    def entries(self) -> list[dict]:
        """All DP-SGD entries, oldest first ([] for a new site)."""
        return list(self._raw().get("entries", []))

    def releases(self) -> list[dict]:
        """All one-off releases (survival histograms), oldest first."""
        return list(self._raw().get("releases", []))

    def noisy_histogram(self, counts, epsilon: float, experiment: str, grid: str,
                        rng: np.random.Generator | None = None) -> tuple[list[int], bool]:
        """The epsilon-DP version of the exact histogram ``counts`` and whether it is new.

        A repeated request for the same counts at the same epsilon and grid (a restarted run, or
        another experiment on the same training patients) gets the noisy histogram released
        before: fresh noise each time would let the coordinator average it away, and re-sending
        a released value costs no privacy. A new release is recorded under ``releases`` with its
        epsilon and the site's total over all histogram releases (basic composition). Call it
        while holding :meth:`locked`. ``rng`` None draws the noise from OS entropy (a real site).
        """
        fingerprint = counts_fingerprint(counts, grid, float(epsilon))

        def make() -> dict:
            noisy = (np.asarray(counts, dtype=np.int64) + discrete_laplace(len(counts), epsilon, rng)).tolist()
            total = sum(float(r["epsilon"]) for r in self.releases() if r.get("kind") == HISTOGRAM_RELEASE)
            return {
                "experiment": experiment, "kind": HISTOGRAM_RELEASE, "site": self.site_id,
                "mechanism": "two-sided geometric (discrete Laplace), L1 sensitivity 1",
                "epsilon": float(epsilon), "delta": 0.0, "cells": len(counts), "grid": grid,
                "histogram_epsilon_total": total + float(epsilon), "fingerprint": fingerprint, "noisy_counts": noisy,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }

        record, new = self.release_once(HISTOGRAM_RELEASE, fingerprint, make)
        return list(record["noisy_counts"]), new

    def in_scope(self, experiment: str, scope: str) -> list[dict]:
        """Entries that count toward the budget: all of them (scope ``site``) or one experiment's."""
        return [e for e in self.entries() if scope == "site" or e.get("experiment") == experiment]

    def releases_in_scope(self, experiment: str, scope: str) -> list[dict]:
        """One-off releases that count toward the budget, as :meth:`in_scope` for entries."""
        return [r for r in self.releases() if scope == "site" or r.get("experiment") == experiment]

    def release_once(self, kind: str, key: str, make) -> tuple[dict, bool]:
        """The release of ``kind`` recorded under fingerprint ``key`` and whether it is new: a
        repeated request gets the record released before (re-sending a released value costs no
        privacy; fresh noise could be averaged away); otherwise ``make()`` builds the record
        (noisy values included), which is appended. Call it while holding :meth:`locked`."""
        earlier = self.releases()
        for rel in earlier:
            if rel.get("kind") == kind and rel.get("fingerprint") == key:
                return rel, False
        record = make()
        self._write(self.entries(), earlier + [record])
        return record, True

    @staticmethod
    def history(entries: Iterable[dict]) -> list[tuple[float, float, int]]:
        """The accountant's composition history of ``entries``."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e.get("steps", 0) > 0]

    @contextmanager
    def locked(self):
        """Hold the ledger's lock: two runs training on this site's data at once would otherwise
        both see the same remaining budget. (POSIX only; elsewhere a no-op.)"""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        with open(self.path.with_name(".privacy.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, entry: dict) -> None:
        """Add one round's entry (written atomically)."""
        entries = self.entries()
        entries.append({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._write(entries, self.releases())

    def _write(self, entries: list[dict], releases: list[dict]) -> None:
        payload = {
            "format": LEDGER_FORMAT,
            "site": self.site_id,
            "about": "Local DP-SGD ledger: one entry per round this site was asked to train. epsilon is "
                     "cumulative over the entries in the budget scope, at the entry's delta, from "
                     "Opacus's accountant over (noise_multiplier, sample_rate, steps) of each entry.",
            "entries": entries,
        }
        if releases:
            payload["releases"] = releases
            payload["about_releases"] = (
                "One-off releases of federated preprocessing: the survival histogram (epsilon-DP, delta 0, "
                "two-sided geometric noise), the class counts and the genomic moments (Gaussian, recorded "
                "with their noise multiplier at sample rate 1, one step). An entry's epsilon is DP-SGD's alone; "
                "its epsilon_total composes DP-SGD with every release in the budget scope in Renyi DP, and "
                "target_epsilon bounds epsilon_total.")
        atomic_write_json(self.path, payload)


# ---------------------------------------------------------------------- coordinator side
def central_entry(rnd: int, history: list[dict], noise_multiplier: float, clipping_norm: float, sample_rate: float,
                  n_sites: int, delta: float, clipping: str) -> dict:
    """Ledger entry of one central-DP release; epsilon composes every earlier central release.

    One round is one release of the Gaussian mechanism on the average of clipped site updates,
    so ``steps`` is 1 and ``sample_rate`` the fraction of training sites sampled that round.
    The unit of privacy is a whole site's contribution (site-level DP).
    """
    releases = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in history]
    releases.append((noise_multiplier, sample_rate, 1))
    return {
        "round": rnd, "site": "(central)", "kind": "central", "status": "released",
        "sample_rate": sample_rate, "noise_multiplier": noise_multiplier, "steps": 1,
        "max_grad_norm": clipping_norm, "clipping": clipping, "sites_aggregated": n_sites,
        "epsilon": compute_epsilon(releases, delta, "rdp"), "delta": delta, "accountant": "rdp",
    }


def run_ledger(experiment: str, local_request: dict, central: dict | None, rounds: list[dict],
               releases: list[dict] = (), stopped: dict | None = None,
               preprocessing_notes: Iterable[str] = ()) -> dict:
    """Content of the run dir's ``privacy.json`` from each round's privacy entries, the one-off
    ``releases`` (the sites' survival histograms, class counts, genomic moments), why training
    ``stopped`` early, if it did, and the ``preprocessing_notes`` (how the merge used the sites'
    statistics: floors, shrinkage, fallbacks), whichever releases there were."""
    entries = [e for r in rounds for e in r.get("privacy", [])]
    final_local: dict[str, dict] = {}
    final_central = None
    for e in entries:
        if e.get("kind") == "central":
            final_central = {k: e[k] for k in ("round", "epsilon", "delta", "noise_multiplier", "max_grad_norm")}
        else:
            final_local[str(e.get("site"))] = {k: e.get(k) for k in ("round", "epsilon", "epsilon_total", "delta",
                                                                  "target_epsilon", "status")}
    worst = max((v["epsilon"] for v in final_local.values() if isinstance(v.get("epsilon"), (int, float))),
                default=None)
    hist = next((r for r in releases if r.get("kind") == "survival_histogram"), None)
    delta = float(local_request.get("delta") or 1e-5) if isinstance(local_request, dict) else 1e-5
    return {
        "format": LEDGER_FORMAT,
        "experiment": experiment,
        "local_dp_requested": local_request,
        "central_dp": central,
        "entries": entries,
        "releases": list(releases),
        "stopped": stopped,
        "preprocessing_notes": list(preprocessing_notes),
        "final": {"local": final_local, "local_max_epsilon": worst, "central": final_central,
                  "survival_histogram_epsilon": hist.get("epsilon") if hist else None,
                  "stopped": stopped["reason"] if stopped else None,
                  "total": site_totals(entries, releases, delta)},
        "notes": [
            "total: one epsilon per site at delta, composing every release of this run at that site (its "
            "DP-SGD rounds, survival histogram, class counts, genomic and patch-feature moments) in Renyi DP; releases lists "
            "each of them with its epsilon alone",
            "survival_histogram: each training site's preprocessing histogram of uncensored survival times is "
            "epsilon-DP (delta 0) per site, released once; epsilon null means exact counts were sent",
            "class_counts: each training site's subtype histogram (grade counts derived from it) carries "
            "Gaussian noise (L2 sensitivity 1, noise_multiplier z), released once (federation.stats_privacy)",
            "genomic_moments: each training site's count, per-gene sum and sum of squares of clipped genomic "
            "values carry Gaussian noise (noise_multiplier z: RDP alpha / (2 z^2)), released once; absent "
            "when federation.stats_privacy is off (then they were exact, outside every epsilon)",
            "feature_moments: each training site's count, sum of clipped patient-mean patch features and sum of "
            "their clipped mean squares carry Gaussian noise (noise_multiplier z), released once to the site "
            "itself for its own patch-feature standardisation (data.site_standardise); only the record leaves",
            "local: per-patient DP-SGD at each site; epsilon is DP-SGD's alone, cumulative over the site's "
            "budget scope (all rounds, resumed runs and, with budget_scope 'site', earlier experiments on the "
            "same data); epsilon_total adds the site's one-off releases in that scope and is what "
            "target_epsilon bounds",
            "central: site-level DP of the aggregate (Flower fixed-clipping wrapper); epsilon from Opacus's "
            "RDP accountant with sample_rate = fraction of training sites per round and one step per round",
            "training losses and evaluation metrics sent to the coordinator are not covered by either guarantee",
            "preprocessing_notes: how the coordinator combined the training sites' statistics (noise floors, "
            "shrinkage of noisy moments, fallbacks); they describe the releases above and cost no privacy",
        ],
    }


def site_totals(entries: list[dict], releases: list[dict], delta: float) -> dict[str, dict]:
    """Per site: the total epsilon at ``delta`` of every release of this run (DP-SGD rounds,
    Gaussian and pure one-off releases, composed by
    :func:`umeml.federation.accountants.total_epsilon`) and the list of those releases (kind,
    epsilon of the release alone, mechanism; steps and rounds for DP-SGD)."""
    from umeml.federation.accountants import total_epsilon

    def covers(r: dict, site: str) -> bool:  # a site's own release, or the coordinator's record of all
        return str(r.get("site")) == site or site in (r.get("sites") or [])

    sites = sorted({str(e.get("site")) for e in entries if e.get("kind") != "central"}
                   | {str(r["site"]) for r in releases if r.get("site") is not None}
                   | {str(s) for r in releases for s in (r.get("sites") or [])})
    out = {}
    for site in sites:
        sgd = [e for e in entries if str(e.get("site")) == site and e.get("kind") != "central" and e.get("steps")]
        one_off = [r for r in releases if covers(r, site) and r.get("epsilon") is not None]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in sgd]
        gaussian, pure = release_terms(one_off)
        listed = ([{"kind": "dp_sgd", "rounds": len(sgd), "steps": sum(int(e["steps"]) for e in sgd),
                    "epsilon_alone": compute_epsilon(history, delta, "rdp"), "delta": delta,
                    "mechanism": "sampled Gaussian (DP-SGD)"}] if sgd else []) + \
                 [{"kind": r.get("kind"), "epsilon_alone": float(r["epsilon"]), "delta": r.get("delta", 0.0),
                   **({"mechanism": r["mechanism"]} if r.get("mechanism") else {})} for r in one_off]
        out[site] = {"epsilon": total_epsilon(history + gaussian, pure, delta), "delta": delta, "releases": listed}
    return out


KEY_CLIPPING_NORM = "clipping_norm"  # the config key Flower's client-side clipping wrapper sends

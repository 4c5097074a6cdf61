"""Model selection of a federation: which round's global weights are the result.

The rule (``federation.selection``) is the centralized trainer's, applied to what a federation
may see: ``best_validation`` picks the round whose global weights score best on the training
sites' validation splits, combined over sites (:func:`umeml.federation.protocol.combine_site_metrics`,
n-weighted; the score is :func:`umeml.train.evaluate.selection_score`, the mean primary metric
over tasks, as for the centralized best epoch). The site-level k rule holds: a site whose
validation split has fewer than ``k_min_patients`` patients sends only its count, so it cannot
take part; a round is a candidate only when the sites that reported hold >= k validation
patients together (the pooled counts decide). ``last`` takes the last round.

Validation may arrive later than the weights it scores (a site validates the weights of round r
when it receives them in round r + 1): every record names the round of the weights it evaluates,
and the candidate weights are kept until their validation arrives, then dropped unless they are
the best so far. Nothing here knows Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from umeml.federation.protocol import combine_site_metrics
from umeml.train.evaluate import selection_score


@dataclass
class RoundSelector:
    """Keeps the best validated round's weights while a federation runs."""

    rule: str  # "best_validation" or "last"
    k_min: int
    best_round: int | None = None
    best_score: float = -np.inf
    best_weights: dict[str, torch.Tensor] | None = None
    scores: dict[int, dict] = field(default_factory=dict)  # round -> {score, n, sites}
    pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def offer(self, rnd: int, weights: dict[str, torch.Tensor]) -> None:
        """The global weights of round ``rnd``: kept until their validation arrives."""
        if self.rule == "best_validation":
            self.pending[rnd] = {k: v.detach().clone() for k, v in weights.items()}

    def observe(self, rnd: int, validation: dict[str, dict]) -> dict | None:
        """Validation reports (site -> report) of the round-``rnd`` weights; returns the round's
        score record, or None when too few validation patients reported (the weights are
        dropped then: the round cannot be selected)."""
        weights = self.pending.pop(rnd, None)
        if self.rule != "best_validation":
            return None
        score = validation_score(validation, self.k_min)
        if score is None:
            return None
        self.scores[rnd] = score
        # ties keep the earlier round (fewer rounds of site noise in it)
        if weights is not None and score["score"] > self.best_score:
            self.best_round, self.best_score, self.best_weights = rnd, score["score"], weights
        return score

    def result(self, last_round: int, last_weights: dict[str, torch.Tensor]) -> tuple[int, dict, dict]:
        """(round, weights, final.json's ``selection`` record) of the selected global weights."""
        record = {"rule": self.rule, "k_min_patients": self.k_min, "last_round": last_round}
        if self.rule == "best_validation" and self.best_round is not None:
            return self.best_round, self.best_weights, {
                **record, "round": self.best_round, "score": self.best_score,
                "n_validation": self.scores[self.best_round]["n"], "sites": self.scores[self.best_round]["sites"],
                "rounds_scored": len(self.scores)}
        why = ("rule 'last'" if self.rule == "last" else
               f"no round had >= k={self.k_min} validation patients at reporting sites: the last round is taken")
        return last_round, last_weights, {**record, "round": last_round, "note": why}

    def state(self) -> dict:
        """What a resumed run needs (the best weights and the scores so far)."""
        return {"rule": self.rule, "best_round": self.best_round, "best_score": self.best_score,
                "best_weights": self.best_weights, "scores": {str(r): s for r, s in self.scores.items()}}

    def restore(self, saved: dict | None) -> None:
        """Continue from :meth:`state`'s record (ignored when the rule changed)."""
        if not saved or saved.get("rule") != self.rule:
            return
        self.best_round = saved.get("best_round")
        self.best_score = float(saved.get("best_score", -np.inf))
        self.best_weights = saved.get("best_weights")
        self.scores = {int(r): s for r, s in (saved.get("scores") or {}).items()}


def validation_score(validation: dict[str, dict], k_min: int) -> dict | None:
    """``{score, n, sites, loss}`` of one round's validation reports combined over the sites
    that reported metrics (each has >= k patients; suppressed sites count for nothing), or None
    when those sites hold fewer than ``k_min`` validation patients together."""
    reported = {s: r for s, r in validation.items() if not r.get("suppressed") and "tasks" in r}
    n = sum(int(r.get("n", 0)) for r in reported.values())
    if not reported or n < k_min:
        return None
    combined = combine_site_metrics(reported, n_boot=0)  # the value only: no site bootstrap per round
    combined.pop("n_suppressed", None)
    loss = float(sum(float(r.get("loss", 0.0)) * int(r["n"]) for r in reported.values()) / n)
    return {"score": selection_score(combined, loss), "n": n, "sites": len(reported), "loss": loss}

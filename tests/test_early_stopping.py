"""Early stopping and model selection on tiny validation splits: minimum events, patience."""

from __future__ import annotations

import math

from umeml.train.evaluate import selection_score
from umeml.train.loop import EarlyStopping


def _metrics(c_index: float, events: int, auc: float | None = None) -> dict:
    out = {"survival": {"c_index": {"value": c_index, "n": 12, "events": events}}}
    if auc is not None:
        out["grade"] = {"auc_macro": {"value": auc, "n": 12}}
    return out


def test_a_c_index_on_too_few_events_does_not_select():
    # 3 deaths: the c-index is left out; survival alone falls back to minus the validation loss
    assert selection_score(_metrics(0.9, events=3), loss=1.25, min_events=10) == -1.25
    assert selection_score(_metrics(0.9, events=3, auc=0.7), loss=1.25, min_events=10) == 0.7
    # enough deaths (or no guard): the c-index counts as before
    assert selection_score(_metrics(0.9, events=12), loss=1.25, min_events=10) == 0.9
    assert selection_score(_metrics(0.9, events=3), loss=1.25) == 0.9


def test_patience_never_stops_before_warm_up_plus_patience():
    stop = EarlyStopping(patience=2, min_epochs=3)  # 1 warm-up epoch + patience 2
    assert stop.update(1, 0.8)
    assert not stop.update(2, 0.7) and not stop.should_stop(2)  # stale 1
    assert not stop.update(3, 0.7) and stop.should_stop(3)  # stale 2 at epoch 3
    late = EarlyStopping(patience=1, min_epochs=4)
    for epoch, score in enumerate([0.9, 0.5, 0.5], start=1):
        late.update(epoch, score)
        assert not late.should_stop(epoch)  # stale >= patience since epoch 2, but still warming up
    assert late.best_epoch == 1
    assert not EarlyStopping(patience=None).should_stop(100)


def test_a_non_finite_score_is_never_an_improvement():
    stop = EarlyStopping(patience=1)
    assert stop.update(1, 0.6)
    assert not stop.update(2, math.nan) and not stop.update(3, math.inf)
    assert stop.best_epoch == 1 and stop.should_stop(3)

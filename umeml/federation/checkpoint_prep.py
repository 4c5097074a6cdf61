"""The public checkpoint's preprocessing, carried into a private federation that fine-tunes it.

A checkpoint written by ``umeml train`` records in its meta what its model was trained with:
the survival bin edges and the genomic standardisation
(:func:`umeml.train.central._checkpoint_meta`). A federation that starts from it
(``federation.init_checkpoint``, ``federation.preprocessing_source`` auto or checkpoint) uses
exactly these, instead of combining new ones from its training sites' statistics: the
fine-tuned survival head keeps predicting the bins it learnt, the genomic inputs keep the
scale the encoder learnt, and no site releases a survival histogram or genomic moments (under
DP more of the epsilon is left to DP-SGD). The checkpoint is public; using its values costs the
sites nothing. The class weights stay the private sites' (from their class counts, DP releases
under statistics privacy): they balance the loss over the data the federation trains on, whose
label mix is not the public one (weights of the public mix lowered the held-out grade AUC of
tests/test_dp_public_init.py from 0.648 to 0.584).
"""

from __future__ import annotations

from umeml.errors import ConfigError
from umeml.federation.stats_release import merge_class_counts
from umeml.train.experiment import Preprocessing
from umeml.train.losses import class_weights_from_counts

__all__ = ["checkpoint_preprocessing", "site_class_weights"]

KEY = "federation.preprocessing_source"


def _problems(meta: dict, schema: dict, heads: dict[str, int], n_bins: int) -> list[str]:
    """What in the checkpoint's meta does not fit this federation (every problem, at once)."""
    out = []
    edges = meta.get("survival_edges")
    if "survival" in heads and (edges is None or len(edges) != n_bins - 1):
        got = "none" if edges is None else f"{len(edges) + 1} bins"
        out.append(f"survival_edges: survival.n_bins is {n_bins}, the checkpoint was trained with {got}")
    for key in ("subtypes", "grades"):
        if key in meta and list(meta[key]) != list(schema[key]):
            out.append(f"{key}: the checkpoint's classes {list(meta[key])} differ from the sites' {list(schema[key])}")
    genes = sum(schema["group_sizes"])
    mean, std = meta.get("genomic_mean"), meta.get("genomic_std")
    if genes and (mean is None or std is None or len(mean) != genes or len(std) != genes):
        out.append(f"genomic_mean / genomic_std: the sites have {genes} genomic values, the checkpoint's "
                   f"standardisation covers {'none' if mean is None else len(mean)}")
    return out


def site_class_weights(replies: dict[str, dict], heads: dict[str, int], notes: list[str]) -> dict[str, list[float]]:
    """Grade / subtype class weights from the training sites' class counts (exact, or DP
    releases merged as :func:`~umeml.federation.stats_release.merge_class_counts` does)."""
    usable = [r for r in replies.values() if not r.get("suppressed")]
    if not usable:
        raise ValueError("no training site reported aggregates (all below the k-patient threshold)")
    return {task: class_weights_from_counts(merge_class_counts(usable, task, notes)).tolist()
            for task in ("grade", "subtype") if task in heads}


def checkpoint_preprocessing(path: str | None, schema: dict, heads: dict[str, int], n_bins: int,
                             class_weights: dict[str, list[float]], notes: list[str]) -> Preprocessing:
    """The federation's :class:`Preprocessing` from the checkpoint at ``path``: its survival bin
    edges and genomic standardisation, with ``class_weights`` (:func:`site_class_weights`) and
    the sites' schema (input sizes, classes). A checkpoint that does not record them, or
    records other sizes, is refused with an error naming the file, the meta keys and the
    setting that avoids it."""
    from umeml.model import load

    if not path:
        raise ConfigError(f"{KEY}: 'checkpoint' needs federation.init_checkpoint (a public checkpoint)")
    _, meta = load(path)
    problems = _problems(meta, schema, heads, n_bins)
    if problems:
        raise ConfigError(f"{path}: {KEY} takes the preprocessing from the checkpoint, but its meta does not fit: "
                          + "; ".join(problems) + f" (retrain it with umeml train, or set {KEY}: sites)")
    genes = sum(schema["group_sizes"])
    notes.append(f"survival bins{' and genomic standardisation' if genes else ''}: the public checkpoint's ({path}); "
                 "no site released a survival histogram or genomic moments")
    return Preprocessing(
        survival_edges=[float(v) for v in meta.get("survival_edges") or []],
        genomic_mean=[float(v) for v in meta["genomic_mean"]] if genes else None,
        genomic_std=[float(v) for v in meta["genomic_std"]] if genes else None,
        class_weights=dict(class_weights), heads=dict(heads), feature_dim=schema["feature_dim"],
        group_sizes=schema["group_sizes"], subtypes=schema["subtypes"], grades=schema["grades"])

"""The public checkpoint's preprocessing, carried into a private federation that fine-tunes it.

A checkpoint written by ``umeml train`` records in its meta what it was trained with: the
survival bin edges, the class weights of the grade and subtype losses and the genomic
standardisation (:func:`umeml.train.central._checkpoint_meta`). A federation that starts from it
(``federation.init_checkpoint``, ``federation.preprocessing_source`` auto or checkpoint) uses
exactly these, instead of combining new ones from its training sites' statistics: the
fine-tuned survival head keeps predicting the bins it learnt, the genomic inputs keep the
scale the encoder learnt, and no site releases a survival histogram, class counts or genomic
moments (under DP the whole epsilon is left to DP-SGD). The checkpoint is public; using its
values costs the sites nothing.
"""

from __future__ import annotations

from umeml.errors import ConfigError
from umeml.train.experiment import Preprocessing

__all__ = ["checkpoint_preprocessing"]

KEY = "federation.preprocessing_source"


def _problems(meta: dict, schema: dict, heads: dict[str, int], n_bins: int) -> list[str]:
    """What in the checkpoint's meta does not fit this federation (every problem, at once)."""
    out = []
    edges = meta.get("survival_edges")
    if "survival" in heads and (edges is None or len(edges) != n_bins - 1):
        got = "none" if edges is None else f"{len(edges) + 1} bins"
        out.append(f"survival_edges: survival.n_bins is {n_bins}, the checkpoint was trained with {got}")
    weights = meta.get("class_weights") or {}
    for task in ("grade", "subtype"):
        if task in heads and len(weights.get(task) or ()) != heads[task]:
            out.append(f"class_weights.{task}: {heads[task]} classes needed, the checkpoint records "
                       f"{len(weights.get(task) or ())}")
    for key in ("subtypes", "grades"):
        if key in meta and list(meta[key]) != list(schema[key]):
            out.append(f"{key}: the checkpoint's classes {list(meta[key])} differ from the sites' {list(schema[key])}")
    genes = sum(schema["group_sizes"])
    mean, std = meta.get("genomic_mean"), meta.get("genomic_std")
    if genes and (mean is None or std is None or len(mean) != genes or len(std) != genes):
        out.append(f"genomic_mean / genomic_std: the sites have {genes} genomic values, the checkpoint's "
                   f"standardisation covers {'none' if mean is None else len(mean)}")
    return out


def checkpoint_preprocessing(path: str | None, schema: dict, heads: dict[str, int], n_bins: int,
                             notes: list[str]) -> Preprocessing:
    """The federation's :class:`Preprocessing` from the checkpoint at ``path``: its survival bin
    edges, class weights and genomic standardisation, with the sites' schema (input sizes,
    classes). A checkpoint that does not record them, or records other sizes, is refused with
    an error naming the file, the meta keys and the setting that avoids it."""
    from umeml.model import load

    if not path:
        raise ConfigError(f"{KEY}: 'checkpoint' needs federation.init_checkpoint (a public checkpoint)")
    _, meta = load(path)
    problems = _problems(meta, schema, heads, n_bins)
    if problems:
        raise ConfigError(f"{path}: {KEY} takes the preprocessing from the checkpoint, but its meta does not fit: "
                          + "; ".join(problems) + f" (retrain it with umeml train, or set {KEY}: sites)")
    genes = sum(schema["group_sizes"])
    notes.append(f"preprocessing (survival bins, class weights{', genomic standardisation' if genes else ''}): the "
                 f"public checkpoint's ({path}); no site released statistics for it")
    weights = {t: [float(v) for v in meta["class_weights"][t]] for t in ("grade", "subtype") if t in heads}
    return Preprocessing(
        survival_edges=[float(v) for v in meta.get("survival_edges") or []],
        genomic_mean=[float(v) for v in meta["genomic_mean"]] if genes else None,
        genomic_std=[float(v) for v in meta["genomic_std"]] if genes else None,
        class_weights=weights, heads=dict(heads), feature_dim=schema["feature_dim"],
        group_sizes=schema["group_sizes"], subtypes=schema["subtypes"], grades=schema["grades"])

"""Held-out predictions kept beside a run, for the report's ROC and Kaplan-Meier plots.

Only a process that already holds the patients' data writes this file: centralized training
(`umeml train`) and a simulation (where the coordinator can see every site). A deployed
coordinator never has per-patient predictions, so its report has no ROC or Kaplan-Meier plot.
The file holds no case or slide ids: scores, labels, times and the site of each patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umeml.rundir import PREDICTIONS_FILE, atomic_write

__all__ = ["FORMAT", "PREDICTIONS_FILE", "HeldOutPredictions", "class_names", "load_predictions", "save_predictions"]
FORMAT = 1


@dataclass(frozen=True)
class HeldOutPredictions:
    """Per-patient held-out outputs: class probabilities, labels, survival risk and outcome."""

    probs: dict[str, np.ndarray]        # task -> (n, classes)
    labels: dict[str, np.ndarray]       # task -> (n,) class index
    classes: dict[str, list[str]]       # task -> class names in column order
    risk: np.ndarray | None             # (n,), higher = shorter predicted survival
    months: np.ndarray | None           # (n,) follow-up in months (None: a run without survival)
    censored: np.ndarray | None         # (n,) 1 = censored (None: a run without survival)
    sites: np.ndarray                   # (n,) site code of each patient

    def __len__(self) -> int:
        return len(self.sites)


def save_predictions(path: str | Path, preds, classes: dict[str, list[str]], sites) -> Path:
    """Write ``preds`` (a :class:`umeml.train.loop.Predictions`) with class names and sites to
    ``path``; follow-up and censorship only with a survival risk (a run without the task survival
    has no survival values to keep)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"format": np.asarray(FORMAT), "sites": np.asarray([str(s) for s in sites])}
    if len(arrays["sites"]) != len(preds.censorship):
        raise ValueError(f"{len(arrays['sites'])} site labels for {len(preds.censorship)} predictions")
    for task, p in preds.probs.items():
        arrays[f"probs__{task}"] = np.asarray(p, np.float32)
        arrays[f"labels__{task}"] = np.asarray(preds.targets[task], np.int64)
        arrays[f"classes__{task}"] = np.asarray(classes[task])
    if preds.risk is not None:
        arrays.update(risk=np.asarray(preds.risk, np.float64), months=np.asarray(preds.times, np.float64),
                      censored=np.asarray(preds.censorship, np.int8))

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: numpy would append .npz to a path without it
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def load_predictions(path: str | Path) -> HeldOutPredictions:
    """Read a file written by :func:`save_predictions`; a clear error when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable predictions file ({err})") from err
    if int(data.get("format", -1)) != FORMAT:
        raise ValueError(f"{path}: predictions format {data.get('format')!r} is not supported (expected {FORMAT})")
    tasks = sorted(k.split("__", 1)[1] for k in data if k.startswith("probs__"))
    return HeldOutPredictions(
        probs={t: data[f"probs__{t}"] for t in tasks},
        labels={t: data[f"labels__{t}"] for t in tasks},
        classes={t: [str(c) for c in data[f"classes__{t}"]] for t in tasks},
        risk=data.get("risk"),
        months=data.get("months"),
        censored=data["censored"].astype(int) if "censored" in data else None,
        sites=data["sites"],
    )


def class_names(cohort) -> dict[str, list[str]]:
    """Class names of the classification heads, in column order, from a cohort's configuration."""
    return {"grade": list(cohort.grades), "subtype": list(cohort.subtypes)}

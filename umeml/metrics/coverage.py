"""Which classes an evaluated set lacks, said before anyone reads its macro AUC.

A held-out set without a class (lower-grade sites only: no grade IV patient) has no AUC for that
class; the macro AUC silently becomes an average over the others, and a reader comparing it with
a set that has every class compares different quantities. These helpers name the missing classes
so that the commands can warn.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["cohort_missing_classes", "missing_class_message", "missing_class_messages"]


def cohort_missing_classes(cohort, indices: Iterable[int], tasks: Iterable[str]) -> dict[str, list[str]]:
    """``{task: [class names without a patient among indices]}`` for the classification tasks in ``tasks``."""
    idx = np.asarray(list(indices), dtype=np.int64)
    out = {}
    for task in tasks:
        if task == "grade":
            names, labels = list(cohort.grades), [cohort.grade_index(int(i)) for i in idx]
        elif task == "subtype":
            names, labels = list(cohort.subtypes), [_subtype_index(cohort, int(i)) for i in idx]
        else:
            continue
        present = {label for label in labels if label >= 0}
        missing = [name for k, name in enumerate(names) if k not in present]
        if missing:
            out[task] = missing
    return out


def _subtype_index(cohort, i: int) -> int:
    try:
        return cohort.subtype_index(i)
    except ValueError:  # a subtype outside the label map counts as unknown
        return -1


def missing_class_message(where: str, task: str, missing: list[str]) -> str:
    """The warning for ``missing`` classes of ``task`` in the set described by ``where``."""
    return (f"{where} have no {task} {', '.join(missing)} patient: its one-vs-rest AUC is undefined there and the "
            f"{task} macro AUC averages the other classes only (choose held-out sites that have every class)")


def missing_class_messages(combined: dict, classes: dict[str, list[str]], where: str) -> list[str]:
    """One warning per task whose class(es) no reporting site has (``missing_classes`` of
    :func:`umeml.federation.protocol.combine_site_metrics`), e.g. a held-out set of lower-grade sites with no grade IV."""
    lines = []
    for task, names in classes.items():
        missing = (combined.get(task) or {}).get("missing_classes") or []
        if missing:
            lines.append(missing_class_message(where, task, [names[i] if i < len(names) else str(i) for i in missing]))
    return lines

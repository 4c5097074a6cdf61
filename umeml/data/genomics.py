"""Gene groups: which genomic columns form each group (signatures CSV, or one flat group)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GENOMIC_SUFFIXES = ("_rnaseq", "_cnv", "_mut")


def genomic_columns(columns: list[str]) -> list[str]:
    """Columns of a table that hold genomic features (suffix ``_rnaseq``, ``_cnv`` or ``_mut``)."""
    return [c for c in columns if c.endswith(GENOMIC_SUFFIXES)]


@dataclass(frozen=True)
class GeneGroups:
    """Named groups of genomic columns; the model's genomic input concatenates them in order."""

    names: tuple[str, ...]
    columns: tuple[tuple[str, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of columns of each group."""
        return tuple(len(c) for c in self.columns)

    @property
    def all_columns(self) -> list[str]:
        """Every group's columns, concatenated group after group (a column may repeat)."""
        return [c for cols in self.columns for c in cols]

    @property
    def dim(self) -> int:
        """Length of the concatenated genomic vector."""
        return sum(self.sizes)

    def gather(self, values: pd.DataFrame) -> np.ndarray:
        """The concatenated group features of each row of ``values`` as float32."""
        return values[self.all_columns].to_numpy(dtype=np.float32)


def read_signatures(path: str | Path) -> dict[str, list[str]]:
    """Read a signatures CSV: one column per group, gene symbols below (blank cells ignored)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path}: the file is empty (a signatures file has one column per gene group)") from err
    except OSError as err:
        raise ValueError(f"{path}: cannot read signatures file ({err.strerror})") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read signatures file ({err})") from err
    groups = {}
    for name in table.columns:
        genes = [g.strip() for g in table[name].dropna() if g.strip()]
        if not genes:
            raise ValueError(f"{path}: group {name!r} lists no genes")
        groups[str(name)] = genes
    if not groups:
        raise ValueError(f"{path}: no gene groups found")
    return groups


def build_gene_groups(
    columns: list[str], mode: str, signatures: dict[str, list[str]] | None, source: str = "signatures"
) -> GeneGroups:
    """Group the genomic ``columns`` by signature (``{gene}_{rnaseq,cnv,mut}`` present) or flat."""
    present = genomic_columns(columns)
    if not present:
        return GeneGroups((), ())
    if mode == "flat" or signatures is None:
        return GeneGroups(("all",), (tuple(present),))
    present_set = set(present)
    names, cols = [], []
    for name, genes in signatures.items():
        group = [f"{g}{sfx}" for g in genes for sfx in GENOMIC_SUFFIXES if f"{g}{sfx}" in present_set]
        if not group:
            raise ValueError(f"{source}: group {name!r} matches no genomic column of the table")
        names.append(name)
        cols.append(tuple(group))
    return GeneGroups(tuple(names), tuple(cols))

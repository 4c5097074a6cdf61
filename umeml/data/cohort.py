"""Cohort assembly and validation: table + signatures + feature bags -> one checked Cohort.

Every problem is collected and raised together (:class:`~umeml.errors.DataValidationError`),
each naming the file, the row or slide, and the rule; nothing is built from bad data.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umeml.config import DataConfig
from umeml.data.bags import BAG_SUFFIX, BagError, BagInfo, bag_path, count_nonfinite, inspect_bag
from umeml.data.genomics import GeneGroups, build_gene_groups, genomic_columns, read_signatures
from umeml.data.labels import (
    ID_COLUMNS,
    SURVIVAL_COLUMNS,
    clean_code,
    column_needs,
    grade_index,
    needs_subtype,
    needs_survival,
    required_columns,
    subtype_codes,
    subtype_index,
)
from umeml.data.sites import load_site_map, resolve_sites
from umeml.errors import DataValidationError, MissingPathError, Problem
from umeml.lazy import lazy_module
from umeml.rundir import name_problem

pd = lazy_module("pandas")  # imported when a table is read, not with the ClientApp

REQUIRED_COLUMNS = required_columns(None)  # with every task; umeml.data.labels says which task needs what
TABLE_NAMES = ("table.csv", "table.csv.gz", "cohort.csv", "cohort.csv.gz")
# a feature scan shows a progress bar from this many feature values on (about 130 MB of float16)
SCAN_PROGRESS_VALUES = 1 << 26


@dataclass(frozen=True)
class Patient:
    """One patient: identity, site, slides (possibly none) and labels."""

    case_id: str
    site: str
    slide_ids: tuple[str, ...]
    subtype: str | None  # None: missing (an empty cell, or no subtype column)
    # None when the cohort was loaded for tasks without survival (the columns are not read)
    survival_months: float | None
    censorship: int | None


@dataclass
class Cohort:
    """A validated cohort. Patients are sorted by case_id; arrays are aligned with them.

    Feature bags are referenced by path only and read lazily by the dataset.
    """

    patients: list[Patient]
    genomics: np.ndarray  # (P, G) float32; rows of patients without genomics are zero
    has_genomics: np.ndarray  # (P,) bool
    gene_groups: GeneGroups
    config: DataConfig
    bag_dir: Path | None = None
    feature_dim: int | None = None
    encoder: str | None = None
    bag_patches: dict[str, int] = field(default_factory=dict)  # slide_id -> n patches
    imputed_values: int = 0
    source: str = ""
    table_genomic_columns: int = 0
    tasks: tuple[str, ...] | None = None  # the tasks its labels were checked for (None: all)

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def subtypes(self) -> tuple[str, ...]:
        """Subtype codes in class-index order."""
        return subtype_codes(self.config)

    @property
    def grades(self) -> tuple[str, ...]:
        """WHO grades in class-index order."""
        return self.config.grades

    @property
    def sites(self) -> list[str]:
        """Distinct sites, sorted."""
        return sorted({p.site for p in self.patients})

    @property
    def has_path(self) -> np.ndarray:
        """(P,) bool: the patient has at least one slide with features."""
        return np.array([bool(p.slide_ids) and self.bag_dir is not None for p in self.patients])

    @property
    def has_survival(self) -> bool:
        """Whether survival times were read (only for the task survival)."""
        return needs_survival(self.tasks)

    def site_indices(self, site: str) -> np.ndarray:
        """Indices of the patients of ``site``."""
        return np.array([i for i, p in enumerate(self.patients) if p.site == site], dtype=np.int64)

    def subtype_index(self, i: int) -> int:
        """Class index of patient ``i``'s subtype (-1 when missing or unknown: only in a cohort
        loaded for tasks that do not need it)."""
        return subtype_index(self.patients[i].subtype, self.config)

    def grade_index(self, i: int) -> int:
        """Class index of patient ``i``'s WHO grade."""
        return grade_index(self.patients[i].subtype, self.config)

    def times_events(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Survival times and event indicators (1 = death observed) of the given patients.

        ValueError for a cohort loaded for tasks without survival: it has no survival values."""
        if not self.has_survival:
            raise ValueError(f"{self.source or 'cohort'}: loaded for the tasks {list(self.tasks or ())}, without "
                             "survival: it has no survival times")
        idx = range(len(self)) if indices is None else indices
        times = np.array([self.patients[i].survival_months for i in idx], dtype=float)
        events = np.array([1 - self.patients[i].censorship for i in idx], dtype=int)
        return times, events

    def bag_files(self, i: int) -> list[Path]:
        """Paths of patient ``i``'s feature bags (empty without pathology)."""
        if self.bag_dir is None:
            return []
        return [bag_path(self.bag_dir, s) for s in self.patients[i].slide_ids]

    def summary(self) -> dict:
        """Counts a site can show without exposing any patient: per site, per label, per modality."""
        subtypes = Counter(p.subtype for p in self.patients)
        grades = Counter(self.config.grade_map.get(p.subtype) for p in self.patients)
        return {
            "patients": len(self),
            "slides": sum(len(p.slide_ids) for p in self.patients),
            "sites": len(self.sites),
            "patients_per_site": dict(sorted(Counter(p.site for p in self.patients).items())),
            "subtype_counts": {c: subtypes.get(c, 0) for c in self.subtypes},
            "grade_counts": {g: grades.get(g, 0) for g in self.grades},
            "subtype_missing": subtypes.get(None, 0),
            "labels_needed": needs_subtype(self.tasks),
            "survival_needed": self.has_survival,
            "censored_fraction": round(float(np.mean([p.censorship for p in self.patients])), 3)
            if self.patients and self.has_survival
            else None,
            "with_pathology": int(self.has_path.sum()),
            "with_genomics": int(self.has_genomics.sum()),
            "feature_dim": self.feature_dim,
            "encoder": self.encoder,
            "table_genomic_columns": self.table_genomic_columns,
            "genomic_features": int(len(set(self.gene_groups.all_columns))),
            "gene_groups": dict(zip(self.gene_groups.names, self.gene_groups.sizes)),
            "imputed_genomic_values": self.imputed_values,
        }


def find_table(data_dir: Path) -> Path:
    """The cohort table inside a data directory (``table.csv`` as ``umeml synth`` writes it)."""
    for name in TABLE_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise MissingPathError(f"{data_dir}: no cohort table found (looked for {', '.join(TABLE_NAMES)})")


def load_data_dir(data_dir: str | Path, cfg: DataConfig | None = None, tasks=None,
                  scan_features: bool = False) -> Cohort:
    """Load a data directory laid out as ``umeml synth`` writes it: table, signatures, bags/.

    ``bags/`` must exist when the table lists slides, and ``signatures.csv`` when the table has
    genomic columns (unless ``data.genomics_mode: flat``); a table used without its slides is
    named on its own (``--table`` without ``--bags``)."""
    data_dir = Path(data_dir)
    table = find_table(data_dir)
    sig = data_dir / "signatures.csv"
    bags = data_dir / "bags"
    builder = _CohortBuilder(table, sig if sig.is_file() else None, bags if bags.is_dir() else None,
                             cfg or DataConfig(), tasks, scan_features)
    builder.expected_signatures = sig
    builder.expected_bags = bags
    return builder.result()


def load_cohort(
    table_path: str | Path,
    signatures_path: str | Path | None = None,
    bag_dir: str | Path | None = None,
    cfg: DataConfig | None = None,
    tasks=None,
    scan_features: bool = False,
) -> Cohort:
    """Read and validate a cohort; raise DataValidationError listing every problem found.

    ``tasks`` (None: all) decide which columns are required: without ``grade`` and ``subtype``
    the table needs no subtype column (``data.subtype_column``, default ``oncotree_code``) and an
    empty or unknown code is no problem; without ``survival`` the survival columns are neither
    needed nor read (the patients' survival values are None).
    ``scan_features`` also reads every bag's features (chunked) to find NaN/Inf values."""
    return _CohortBuilder(Path(table_path), signatures_path, bag_dir, cfg or DataConfig(), tasks, scan_features).result()


class _CohortBuilder:
    """Runs every check, collecting problems instead of stopping at the first."""

    def __init__(self, table_path: Path, signatures_path, bag_dir, cfg: DataConfig, tasks=None,
                 scan_features: bool = False):
        self.table_path = table_path
        self.signatures_path = Path(signatures_path) if signatures_path else None
        self.bag_dir = Path(bag_dir) if bag_dir else None
        self.cfg = cfg
        self.scan_features = scan_features
        self.problems: list[Problem] = []
        self.src = str(table_path)
        self.tasks: tuple[str, ...] | None = None if tasks is None else tuple(tasks)
        # whether the rows' survival values and subtype codes are checked and read (the tasks need
        # them and their columns exist; a missing column is reported once, not per row)
        self.survival = needs_survival(self.tasks)
        self.subtype = needs_subtype(self.tasks)
        # a data directory's own signatures.csv and bags/, when absent (for the messages)
        self.expected_signatures: Path | None = None
        self.expected_bags: Path | None = None

    def result(self) -> Cohort:
        """The cohort; DataValidationError listing every problem found."""
        cohort = self.build()
        if self.problems or cohort is None:
            raise DataValidationError(self.problems)
        return cohort

    def problem(self, location: str, rule: str, source: str | None = None) -> None:
        self.problems.append(Problem(source or self.src, location, rule))

    def build(self) -> Cohort | None:
        table = self._read_table()
        if table is None:
            return None
        site_map = None
        if self.cfg.site_map:
            try:
                site_map = load_site_map(self.cfg.site_map)
            except ValueError as err:
                self.problem("", str(err).removeprefix(f"{self.cfg.site_map}: "), source=self.cfg.site_map)
        sites, site_problems = resolve_sites(table, self.src, site_map)
        self.problems.extend(site_problems)
        table = table.assign(_site=sites)
        self._check_rows(table)
        groups = self._gene_groups(list(table.columns))
        patients, first_rows = self._patients(table)
        genomics, has_gen, imputed = self._genomics(table, first_rows, groups)
        feature_dim, encoder, patches = self._check_bags(table)
        if self.problems:
            return None
        return Cohort(
            patients=patients,
            genomics=genomics,
            has_genomics=has_gen,
            gene_groups=groups,
            config=self.cfg,
            bag_dir=self.bag_dir,
            feature_dim=feature_dim,
            encoder=encoder,
            bag_patches=patches,
            imputed_values=imputed,
            source=self.src,
            table_genomic_columns=len(genomic_columns(list(table.columns))),
            tasks=self.tasks,
        )

    def _read_table(self) -> pd.DataFrame | None:
        column = self.cfg.subtype_column
        try:
            table = pd.read_csv(
                self.table_path,
                dtype={"case_id": str, "slide_id": str, "site": str, column: str},
                keep_default_na=True,
            )
        except pd.errors.EmptyDataError:
            self.problem("", "the file is empty (a table needs a header row and one row per slide)")
            return None
        except (OSError, pd.errors.ParserError, UnicodeDecodeError, EOFError) as err:
            self.problem("", f"cannot read the table ({err})")
            return None
        if not self._has_columns(table):
            return None
        if table.empty:
            self.problem("", "the table has no rows (only its header)")
            return None
        # the subtype codes under one internal name, whatever data.subtype_column calls them; no
        # column (allowed when no task needs it): every subtype is missing
        codes = table[column] if column in table.columns else pd.Series(None, index=table.index, dtype=object)
        table["_subtype"] = codes.map(clean_code).astype(object)
        table["slide_id"] = table["slide_id"].fillna("").astype(str).str.strip()
        table["case_id"] = table["case_id"].fillna("").astype(str).str.strip()
        return table

    def _has_columns(self, table: pd.DataFrame) -> bool:
        """Every column the tasks need, each missing one named with the task that needs it.

        Without an id column nothing else can be checked (False); a missing task column is
        reported and the rest of the table is still checked, so every problem comes at once."""
        needs = column_needs(self.tasks, self.cfg.subtype_column)
        missing = [c for c in needs if c not in table.columns]
        for col in missing:
            if not needs[col]:
                self.problem("", f"missing required column {col} (every table needs it)")
            elif col in SURVIVAL_COLUMNS:
                self.problem("", f"missing required column {col}: the task survival needs it (an experiment "
                                 "without survival, e.g. tasks: [grade, subtype], does without it)")
            else:
                self.problem("", f"missing required column {col} (data.subtype_column): the task(s) "
                                 f"{' and '.join(needs[col])} need it (a survival-only experiment, tasks: [survival], "
                                 "does without it)")
        self.survival = needs_survival(self.tasks) and not set(SURVIVAL_COLUMNS) & set(missing)
        self.subtype = needs_subtype(self.tasks) and self.cfg.subtype_column not in missing
        return not set(ID_COLUMNS) & set(missing)

    def _check_code(self, loc: str, code: str | None) -> None:
        """The subtype code of one row, when the tasks need it (survival-only: anything goes)."""
        if not self.subtype:
            return
        known, column = subtype_codes(self.cfg), self.cfg.subtype_column
        if code is None:
            self.problem(loc, f"{column} is missing (empty); the tasks grade and subtype need a known subtype "
                              f"({', '.join(sorted(known))}) for every patient")
        elif code not in known:
            self.problem(loc, f"{column} {code!r} is not a known subtype ({', '.join(sorted(known))})")

    def _check_survival(self, table: pd.DataFrame) -> None:
        """survival_months and censorship of every row, when the task survival reads them."""
        if not self.survival:
            return
        months = pd.to_numeric(table["survival_months"], errors="coerce")
        cens = pd.to_numeric(table["censorship"], errors="coerce")
        for i, case in enumerate(table["case_id"]):
            loc = f"row {i + 2}, case {case or '?'}"
            t = months.iloc[i]
            if pd.isna(t) or not np.isfinite(t):
                self.problem(loc, "survival_months is missing or not a number")
            elif t < 0:
                self.problem(loc, f"survival_months must be >= 0 (got {t})")
            c = cens.iloc[i]
            if pd.isna(c) or c not in (0, 1):
                self.problem(loc, f"censorship must be 0 or 1 (got {_shown(table['censorship'].iloc[i])})")

    def _check_rows(self, table: pd.DataFrame) -> None:
        self._check_survival(table)
        codes = table["_subtype"]
        for i, row in enumerate(table[["case_id", "slide_id"]].itertuples(index=False)):  # not the genomic columns
            loc = f"row {i + 2}, case {row.case_id or '?'}"
            if not row.case_id:
                self.problem(f"row {i + 2}", "case_id is empty")
            if row.slide_id and name_problem(row.slide_id):  # <bags>/<slide_id>.h5 must stay inside <bags>
                self.problem(loc, f"slide_id {row.slide_id!r} {name_problem(row.slide_id)}")
            self._check_code(loc, codes.iloc[i])
        slides = table.loc[table["slide_id"] != "", "slide_id"]
        for slide in sorted(slides[slides.duplicated()].unique()):
            self.problem(f"slide {slide}", "slide_id appears on more than one row")
        names = {"_subtype": self.cfg.subtype_column, "_site": "site"}
        for col in ["_subtype", *(SURVIVAL_COLUMNS if self.survival else ()), "_site"]:
            n_distinct = table.groupby("case_id")[col].nunique(dropna=False)
            for case in n_distinct[n_distinct > 1].index:
                values = sorted(map(str, table.loc[table["case_id"] == case, col].unique()))
                self.problem(f"case {case}", f"conflicting {names.get(col, col)} values across its rows: {values}")

    def _gene_groups(self, columns: list[str]) -> GeneGroups:
        signatures = None
        n_genomic = len(genomic_columns(columns))
        if self.cfg.genomics_mode == "signatures" and self.signatures_path is None and n_genomic:
            self._missing_signatures(n_genomic)
            return GeneGroups((), ())
        if self.cfg.genomics_mode == "signatures" and self.signatures_path is not None:
            try:
                signatures = read_signatures(self.signatures_path)
            except ValueError as err:
                self.problem("", str(err).removeprefix(f"{self.signatures_path}: "), source=str(self.signatures_path))
                return GeneGroups((), ())
        try:
            return build_gene_groups(columns, self.cfg.genomics_mode, signatures, str(self.signatures_path))
        except ValueError as err:
            self.problem("", str(err).removeprefix(f"{self.signatures_path}: "), source=str(self.signatures_path))
            return GeneGroups((), ())

    def _missing_signatures(self, n_genomic: int) -> None:
        flat = "or set data.genomics_mode: flat to use every genomic column as one group"
        if self.expected_signatures is not None:
            self.problem("", f"not found, and the table has {n_genomic} genomic columns to group: add it, {flat}",
                         source=str(self.expected_signatures))
        else:
            self.problem("", f"the table has {n_genomic} genomic columns but no signatures file was given "
                             f"(--signatures, or signatures: in a site file): give one, {flat}")

    def _patients(self, table: pd.DataFrame) -> tuple[list[Patient], dict[str, int]]:
        patients, first_rows = [], {}
        # only the columns read here: a row of the whole table (thousands of genomic columns) is
        # slow to take out, once per patient
        read = [c for c in ("case_id", "slide_id", "_site", "_subtype", "survival_months", "censorship")
                if c in table.columns]
        for case, rows in table[read].groupby("case_id", sort=True):
            if not case:
                continue
            first = rows.iloc[0]
            first_rows[case] = int(rows.index[0])
            months = cens = None  # not read without the task survival
            if self.survival:
                try:
                    months, cens = float(first["survival_months"]), int(float(first["censorship"]))
                except (TypeError, ValueError):
                    continue  # already reported by _check_survival
            slides = tuple(s for s in rows["slide_id"] if s)
            patients.append(Patient(case, first["_site"], slides, first["_subtype"], months, cens))
        return patients, first_rows

    def _genomics(
        self, table: pd.DataFrame, first_rows: dict[str, int], groups: GeneGroups
    ) -> tuple[np.ndarray, np.ndarray, int]:
        cases = sorted(first_rows)
        if groups.dim == 0:
            return np.zeros((len(cases), 0), np.float32), np.zeros(len(cases), bool), 0
        cols = genomic_columns(list(table.columns))
        raw = table[cols].apply(pd.to_numeric, errors="coerce")
        text = self._non_numeric(table, cols, raw)
        several = table["case_id"].duplicated(keep=False)  # a patient of one row cannot conflict
        for case, rows in table.loc[several, ["case_id"]].groupby("case_id"):
            block = raw.loc[rows.index].to_numpy(dtype=float)
            if not np.allclose(block, block[0], equal_nan=True):
                self.problem(f"case {case}", "conflicting genomic values across its rows")
        first = [first_rows[c] for c in cases]
        values = raw.loc[first].to_numpy(dtype=float)
        is_text = text.loc[first].to_numpy()
        # a row is "no genomics" only when every cell is empty; text cells are reported, not missing
        all_missing = (np.isnan(values) & ~is_text).all(axis=1)
        bad = ~np.isfinite(values) & ~all_missing[:, None] & ~is_text
        imputed = 0
        if bad.any():
            if self.cfg.genomic_nan_policy == "error":
                self._report_nonfinite(bad, cols, [first_rows[c] for c in cases], cases)
            else:
                clean = np.where(np.isfinite(values), values, np.nan)
                with warnings.catch_warnings():  # a column without any value: its median is NaN, made 0 below
                    warnings.simplefilter("ignore", RuntimeWarning)
                    medians = np.nanmedian(clean[~all_missing], axis=0) if (~all_missing).any() else np.zeros(len(cols))
                medians = np.where(np.isnan(medians), 0.0, medians)
                values = np.where(bad, medians[None, :], values)
                imputed = int(bad.sum())
        frame = pd.DataFrame(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), columns=cols)
        return groups.gather(frame), ~all_missing, imputed

    def _non_numeric(self, table: pd.DataFrame, cols: list[str], raw: pd.DataFrame) -> pd.DataFrame:
        """Cells of genomic columns holding text that is no number (reported; never imputed)."""
        text = pd.DataFrame(False, index=table.index, columns=cols)
        for col in (c for c in cols if table[c].dtype == object):
            text[col] = table[col].notna() & raw[col].isna()
        for i in np.where(text.to_numpy().any(axis=1))[0]:
            cells = [(c, table[c].iloc[i]) for c in cols if text[c].iloc[i]]
            shown = ", ".join(f"{c} = {v!r}" for c, v in cells[:3]) + (
                f" and {len(cells) - 3} more" if len(cells) > 3 else "")
            self.problem(f"row {i + 2}, case {table['case_id'].iloc[i] or '?'}",
                         f"non-numeric genomic value(s): {shown} (genomic values must be numbers, or empty when missing)")
        return text

    def _report_nonfinite(self, bad: np.ndarray, cols: list[str], rows: list[int], cases: list[str]) -> None:
        for r in np.where(bad.any(axis=1))[0]:
            names = [cols[j] for j in np.where(bad[r])[0]]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.problem(
                f"row {rows[r] + 2}, case {cases[r]}",
                f"{len(names)} NaN/Inf genomic value(s) in {shown} "
                "(set data.genomic_nan_policy: impute_median to impute)",
            )

    def _check_bags(self, table: pd.DataFrame) -> tuple[int | None, str | None, dict[str, int]]:
        slides = [s for s in table["slide_id"] if s and not name_problem(s)]  # unsafe ids: reported by rows
        if self.bag_dir is None:
            if self.expected_bags is not None and slides:
                self.problem("", f"not found, but the table lists {len(slides)} slides: put their feature bags "
                             "there, or use the table without pathology by naming its files (--table and "
                             "--signatures without --bags, or table: and signatures: in a site file)",
                             source=str(self.expected_bags))
            return None, None, {}
        if not self.bag_dir.is_dir():  # CohortSource names this as a usage error first; direct callers get it here
            self.problem("", "feature bag directory does not exist", source=str(self.bag_dir))
            return None, None, {}
        infos = {slide: info for slide in slides if (info := self._inspect_slide(slide)) is not None}
        known = set(slides)
        for extra in sorted(self.bag_dir.glob(f"*{BAG_SUFFIX}")):
            if extra.name[: -len(BAG_SUFFIX)] not in known and extra.is_file():
                self.problem(f"slide {extra.stem}", "feature bag has no row in the table", str(extra))
        feature_dim, encoder = self._check_consistency(infos)
        if self.scan_features:
            self._scan(infos)
        return feature_dim, encoder, {slide: info.n_patches for slide, info in infos.items()}

    def _inspect_slide(self, slide: str) -> BagInfo | None:
        path = bag_path(self.bag_dir, slide)
        if path.is_dir():
            self.problem(f"slide {slide}", "is a directory, not a feature bag file", str(path))
            return None
        if not path.is_file():
            self.problem(f"slide {slide}", "slide has no feature bag (expected this file)", str(path))
            return None
        try:
            info = inspect_bag(path)
        except BagError as err:
            self.problem(f"slide {slide}", str(err).split(": ", 1)[-1], str(path))
            return None
        if info.n_patches == 0:
            self.problem(f"slide {slide}", "empty bag: no patches", str(path))
            return None
        return info

    def _check_consistency(self, infos: dict[str, BagInfo]) -> tuple[int | None, str | None]:
        """The cohort's feature dim and encoder (the most common); every bag that differs is a problem."""
        dims = Counter(i.feature_dim for i in infos.values())
        encoders = Counter(i.encoder for i in infos.values())
        feature_dim = dims.most_common(1)[0][0] if dims else None
        encoder = encoders.most_common(1)[0][0] if encoders else None
        for slide, info in infos.items():
            if info.feature_dim != feature_dim:
                self.problem(
                    f"slide {slide}",
                    f"feature dim {info.feature_dim} differs from the cohort's {feature_dim}",
                    str(info.path),
                )
            elif info.encoder != encoder:
                self.problem(
                    f"slide {slide}", f"encoder {info.encoder!r} differs from the cohort's {encoder!r}", str(info.path)
                )
        return feature_dim, encoder

    def _scan(self, infos: dict[str, BagInfo]) -> None:
        """Read every bag's features (chunked) for NaN/Inf; a progress bar on large cohorts."""
        from tqdm import tqdm

        total = sum(i.n_patches for i in infos.values())
        values = sum(i.n_patches * i.feature_dim for i in infos.values())
        with tqdm(total=total, desc="scanning patch features", unit="patch", unit_scale=True, leave=False,
                  disable=values < SCAN_PROGRESS_VALUES, file=sys.stderr) as bar:
            for slide, info in infos.items():
                try:
                    bad, first = count_nonfinite(info.path)
                except BagError as err:
                    self.problem(f"slide {slide}", str(err).split(": ", 1)[-1], str(info.path))
                    continue
                if bad:
                    self.problem(f"slide {slide}", f"'features' has NaN/Inf values in {bad} of {info.n_patches} "
                                 f"patches (first at row {first}); re-extract this slide", str(info.path))
                bar.update(info.n_patches)


def _shown(value) -> str:
    """A cell as the user wrote it: numpy scalars as plain numbers (``2``, not ``np.int64(2)``)."""
    return repr(value.item() if isinstance(value, np.generic) else value)

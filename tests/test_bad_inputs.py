"""The bad-input battery (issue 15): bad inputs a new user tries, one row each, across every command.

Each row builds its input in a fresh folder (a copy of a tiny synthetic cohort, a finished run
dir, config and site files), runs the command in-process through its ``main(argv)``, and checks
the exit code (0 done, 1 data problem, 2 usage error), the fragments the message must hold (the
file, field or row and the rule), that no traceback is printed, and that no file that existed
before was changed or removed and no new file was written. The work a command would start on
accepted input (training, a simulation, a SuperLink or SuperNode, an extraction) is replaced by a
guard that fails, so a bad input that slips through fails its row instead of running.

``python tests/test_bad_inputs.py --write docs/bad_inputs.md`` runs the same rows and writes the
table (input -> exit code, message) with the measured totals.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from umeml.data.synth import SynthSpec, generate

SPEC = SynthSpec(sites=3, patients=4, seed=3, feature_dim=8, median_patches=10, min_patches=4, max_patches=24,
                 missing_fraction=0.0, two_slide_fraction=0.0)
EXPERIMENT = {
    "name": "battery", "seed": 0, "tasks": ["grade", "subtype", "survival"],
    "data": {"max_patches": 16}, "split": {"test_sites": ["A2"]},
    "model": {"hidden_dim": 16, "n_prototypes": 2, "n_registers": 1, "dropout": 0.0, "drop_path": 0.0},
    "train": {"epochs": 1, "batch_size": 4, "bootstrap": 0},
    "federation": {"rounds": 1, "min_train_sites": 1, "k_min_patients": 2},
}
MAINS = {"umeml": "umeml.cli", "umeml-server": "umeml.server.cli", "umeml-client": "umeml.client.cli"}


class Env:
    """The folder one row builds its input in (everything under it is hashed before and after)."""

    def __init__(self, root: Path, base: Path):
        self.root, self.base = root, base

    def p(self, name: str) -> str:
        """A path under the row's folder (need not exist)."""
        return str(self.root / name)

    def data(self, *edits: Callable[[Path], None], name: str = "data") -> str:
        """A copy of the tiny cohort, changed by ``edits``."""
        d = self.root / name
        shutil.copytree(self.base, d)
        for edit in edits:
            edit(d)
        return str(d)

    def file(self, name: str, text: str = "x") -> str:
        """A plain file (e.g. an --out that is a file)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def config(self, text: str | None = None, name: str = "exp.yaml", **sections) -> str:
        """The tiny experiment with sections replaced, or the given text."""
        raw = {**EXPERIMENT, **{k: {**EXPERIMENT.get(k, {}), **v} for k, v in sections.items()}}
        return self.file(name, yaml.safe_dump(raw) if text is None else text)

    def run_dir(self, name: str = "run") -> str:
        """A finished run dir: its files must come out of every row byte-identical."""
        d = self.root / name
        (d / "checkpoints").mkdir(parents=True)
        (d / "final.json").write_text('{"schema_version": 2, "mode": "centralized"}')
        (d / "metrics.csv").write_text("unit,step,kind,site,n,task,metric,value,ci_low,ci_high,note\n")
        (d / "checkpoints" / "best.pt").write_bytes(b"weights")
        (d / "report.html").write_text("<html>earlier run</html>")
        return str(d)

    def site(self, data: str | None = None, text: str | None = None, name: str = "site.yaml", **keys) -> str:
        """A site file (data_dir = ``data``, a fresh copy of the cohort by default)."""
        if text is None:
            raw = {"site_id": "A0", "data_dir": data or self.data(), "state_dir": self.p("state"), **keys}
            text = yaml.safe_dump({k: v for k, v in raw.items() if v is not None})
        return self.file(name, text)


# ------------------------------------------------------------------ edits of a data dir
def _table(d: Path) -> pd.DataFrame:
    return pd.read_csv(d / "table.csv", dtype={"case_id": str, "slide_id": str, "site": str, "oncotree_code": str})


def edit_table(fn: Callable[[pd.DataFrame], pd.DataFrame | None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        df = _table(d)
        out = fn(df)
        (out if out is not None else df).to_csv(d / "table.csv", index=False)
    return edit


def set_cell(row: int, col: str, value) -> Callable[[Path], None]:
    def fn(df):
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
    return edit_table(fn)


def header_only(d: Path) -> None:
    (d / "table.csv").write_text((d / "table.csv").read_text().splitlines()[0] + "\n")


def first_bag(d: Path, k: int = 0) -> Path:
    return d / "bags" / f"{_table(d)['slide_id'].iloc[k]}.h5"


def bag_value(value: float, k: int = 0) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        with h5py.File(first_bag(d, k), "r+") as f:
            f["features"][1, 2] = value
    return edit


def rewrite_bag(features, coords=None, k: int = 0) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        path = first_bag(d, k)
        path.unlink()
        with h5py.File(path, "w") as f:
            f["features"] = features
            if coords is not None:
                f["coords"] = coords
    return edit


def remove(rel: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        target = d / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return edit


def bag_as_directory(d: Path) -> None:
    path = first_bag(d)
    path.unlink()
    path.mkdir()


def truncate_bag(d: Path) -> None:
    path = first_bag(d)
    path.write_bytes(path.read_bytes()[:300])


def extra_bag(d: Path) -> None:
    shutil.copy(first_bag(d), d / "bags" / "NOT-IN-TABLE.h5")


def drop_column(col: str) -> Callable[[Path], None]:
    return edit_table(lambda df: df.drop(columns=[col]))


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    """One bad input: what it is, how it is built, the exit code and the message it must give."""

    id: str
    what: str
    argv: Callable[[Env], list[str]]
    code: int
    fragments: tuple[str, ...]
    absent: tuple[str, ...] = ()
    once: tuple[str, ...] = field(default=())  # fragments that must appear exactly once


def C(id, what, argv, code, *fragments, absent=(), once=()):  # noqa: N802 - a table row, kept short
    return Case(id, what, argv, code, tuple(fragments), tuple(absent), tuple(once))


DATA_CASES = [
    C("check-header-only", "table with a header and no rows", lambda e: ["umeml", "check", "--table",
      e.data(header_only) + "/table.csv", "--signatures", e.p("data/signatures.csv")],
      1, "table.csv", "the table has no rows", absent=("check OK",)),
    C("check-header-only-bags", "header-only table with its bags", lambda e: ["umeml", "check", "--data",
      e.data(header_only)], 1, "the table has no rows", absent=("feature bag has no row",)),
    C("check-empty-table-file", "table file of 0 bytes", lambda e: ["umeml", "check", "--data",
      e.data(lambda d: (d / "table.csv").write_text(""))], 1, "table.csv", "the file is empty"),
    C("check-binary-table", "table that is not a CSV", lambda e: ["umeml", "check", "--data",
      e.data(lambda d: (d / "table.csv").write_bytes(b"\x00\xff\xfe" * 50))], 1, "table.csv", "cannot read the table"),
    C("check-missing-column", "table without survival_months", lambda e: ["umeml", "check", "--data",
      e.data(drop_column("survival_months"))], 1, "table.csv", "missing required column survival_months: the task survival"),
    C("check-nan-features", "a bag with a NaN patch feature", lambda e: ["umeml", "check", "--data",
      e.data(bag_value(np.nan))], 1, "TCGA-A0-0000", "NaN/Inf", "1 of"),
    C("check-inf-features", "a bag with an Inf patch feature", lambda e: ["umeml", "check", "--data",
      e.data(bag_value(np.inf))], 1, "TCGA-A0-0000", "NaN/Inf"),
    C("check-slide-escapes", "slide_id ../../etc/passwd", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "slide_id", "../../etc/passwd"))], 1, "row 2", "slide_id", "../../etc/passwd",
      "must be a file name"),
    C("check-site-escapes", "site ../../etc", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "site", "../../etc"))], 1, "row 2", "site", "../../etc", "must be a file name"),
    C("check-no-bags-dir", "data dir without bags/ while the table lists slides", lambda e: ["umeml", "check",
      "--data", e.data(remove("bags"))], 1, "bags", "lists 12 slides", "--table"),
    C("check-no-signatures-flag", "table with genomic columns given without --signatures", lambda e: [
      "umeml", "check", "--table", e.data() + "/table.csv", "--bags", e.p("data/bags")], 1, "table.csv",
      "no signatures file", "genomics_mode: flat"),
    C("check-dir-without-signatures", "data dir without signatures.csv", lambda e: ["umeml", "check", "--data",
      e.data(remove("signatures.csv"))], 1, "signatures.csv", "genomics_mode: flat"),
    C("check-signatures-missing", "--signatures naming no file", lambda e: ["umeml", "check", "--table",
      e.data() + "/table.csv", "--signatures", e.p("nope.csv")], 2, "--signatures", "not found",
      once=("nope.csv",)),
    C("check-signatures-empty", "signatures file of 0 bytes", lambda e: ["umeml", "check", "--data",
      e.data(lambda d: (d / "signatures.csv").write_text(""))], 1, "signatures.csv", "the file is empty",
      once=("signatures.csv",)),
    C("check-signatures-no-match", "a gene group matching no column", lambda e: ["umeml", "check", "--data",
      e.data(lambda d: (d / "signatures.csv").write_text("g1\nNOSUCHGENE\n"))], 1, "signatures.csv",
      "'g1' matches no genomic column"),
    C("check-table-missing", "--table naming no file", lambda e: ["umeml", "check", "--table", e.p("t.csv"),
      "--signatures", e.data() + "/signatures.csv"], 2, "--table", "t.csv", "not found"),
    C("check-table-is-dir", "--table naming a folder", lambda e: ["umeml", "check", "--table", e.data(),
      "--signatures", e.p("data/signatures.csv")], 2, "--table", "is a directory"),
    C("check-data-missing", "--data naming no folder", lambda e: ["umeml", "check", "--data", e.p("nowhere")],
      2, "--data", "nowhere", "not found"),
    C("check-data-is-file", "--data naming a file", lambda e: ["umeml", "check", "--data", e.file("f.csv")],
      2, "--data", "f.csv", "is a file"),
    C("check-data-no-table", "data dir without a table", lambda e: ["umeml", "check", "--data",
      e.data(remove("table.csv"))], 2, "no cohort table", "table.csv"),
    C("check-bags-missing", "--bags naming no folder", lambda e: ["umeml", "check", "--table",
      e.data() + "/table.csv", "--signatures", e.p("data/signatures.csv"), "--bags", e.p("nobags")],
      2, "--bags", "nobags", "not found"),
    C("check-data-and-table", "--data and --table together", lambda e: ["umeml", "check", "--data", e.data(),
      "--table", "t.csv"], 2, "--data / --table: give exactly one of them"),
    C("check-signatures-with-data", "--signatures with --data", lambda e: ["umeml", "check", "--data",
      e.data(), "--signatures", "s.csv"], 2, "--signatures: only with --table"),
    C("check-no-source", "neither --data nor --table", lambda e: ["umeml", "check"], 2,
      "give exactly one of them"),
    C("check-non-numeric-genomic", "genomic value 'abc'", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "SG1X1_rnaseq", "abc"))], 1, "row 2", "SG1X1_rnaseq", "non-numeric", "'abc'",
      absent=("NaN/Inf", "impute")),
    C("check-nan-genomic", "genomic value NaN in one column", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "SG1X1_rnaseq", np.nan))], 1, "row 2", "SG1X1_rnaseq", "NaN/Inf",
      "genomic_nan_policy: impute_median"),
    C("check-bag-is-directory", "a folder named <slide>.h5", lambda e: ["umeml", "check", "--data",
      e.data(bag_as_directory)], 1, "TCGA-A0-0000", "is a directory", absent=("has no feature bag",)),
    C("check-censorship-2", "censorship 2", lambda e: ["umeml", "check", "--data", e.data(set_cell(0, "censorship", 2))],
      1, "row 2", "censorship must be 0 or 1 (got 2)", absent=("np.", "int64")),
    C("check-negative-survival", "survival_months -3", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "survival_months", -3.0))], 1, "row 2", "survival_months must be >= 0 (got -3.0)",
      absent=("np.",)),
    C("check-text-survival", "survival_months 'soon'", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "survival_months", "soon"))], 1, "row 2", "survival_months is missing or not a number"),
    C("check-unknown-subtype", "oncotree_code XYZ", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "oncotree_code", "XYZ"))], 1, "row 2", "oncotree_code", "XYZ"),
    C("check-duplicate-slide", "one slide on two rows", lambda e: ["umeml", "check", "--data",
      e.data(edit_table(lambda df: pd.concat([df, df.iloc[[0]]])))], 1, "TCGA-A0-0000", "more than one row"),
    C("check-conflicting-labels", "two rows of a case with different survival", lambda e: ["umeml", "check",
      "--data", e.data(edit_table(lambda df: pd.concat([df, df.iloc[[0]].assign(slide_id="S2",
                                                                                survival_months=99.0)])))],
      1, "TCGA-A0-0000", "conflicting survival_months"),
    C("check-empty-case-id", "an empty case_id", lambda e: ["umeml", "check", "--data",
      e.data(set_cell(0, "case_id", np.nan))], 1, "row 2", "case_id is empty"),
    C("check-no-site", "a case that is no TCGA barcode and has no site", lambda e: ["umeml", "check", "--data",
      e.data(drop_column("site"), set_cell(0, "case_id", "patient-1"))], 1, "row 2", "no 'site' value"),
    C("check-truncated-bag", "a truncated h5 bag", lambda e: ["umeml", "check", "--data", e.data(truncate_bag)],
      1, "TCGA-A0-0000", "unreadable or truncated"),
    C("check-bag-no-coords", "a bag without coords", lambda e: ["umeml", "check", "--data",
      e.data(rewrite_bag(np.zeros((5, 8), np.float32)))], 1, "TCGA-A0-0000", "missing dataset 'coords'"),
    C("check-empty-bag", "a bag with no patches", lambda e: ["umeml", "check", "--data",
      e.data(rewrite_bag(np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64)))], 1, "TCGA-A0-0000",
      "empty bag"),
    C("check-int-features", "integer features", lambda e: ["umeml", "check", "--data",
      e.data(rewrite_bag(np.zeros((5, 8), np.int32), np.zeros((5, 2), np.int64)))], 1, "TCGA-A0-0000",
      "'features' must be float16/float32, is int32"),
    C("check-mixed-dims", "one bag of another feature dim", lambda e: ["umeml", "check", "--data",
      e.data(rewrite_bag(np.zeros((5, 4), np.float32), np.zeros((5, 2), np.int64)))], 1, "TCGA-A0-0000",
      "feature dim 4 differs from the cohort's 8"),
    C("check-missing-bag", "a slide without its bag", lambda e: ["umeml", "check", "--data",
      e.data(lambda d: first_bag(d).unlink())], 1, "TCGA-A0-0000", "has no feature bag"),
    C("check-extra-bag", "a bag with no row", lambda e: ["umeml", "check", "--data", e.data(extra_bag)], 1,
      "NOT-IN-TABLE", "no row in the table"),
    C("check-all-at-once", "a NaN bag, censorship 2 and a negative survival together", lambda e: ["umeml",
      "check", "--data", e.data(bag_value(np.nan), set_cell(3, "censorship", 2), set_cell(5, "survival_months", -1))],
      1, "3 data problem(s)", "NaN/Inf", "censorship", "survival_months must be >= 0"),
    C("check-empty-config", "--config of 0 bytes", lambda e: ["umeml", "check", "--data", e.data(), "--config",
      e.config("")], 2, "exp.yaml", "the config file is empty"),
    C("check-config-comment-only", "--config holding only a comment", lambda e: ["umeml", "check", "--data",
      e.data(), "--config", e.config("# nothing yet\n")], 2, "exp.yaml", "the config file is empty"),
    C("check-config-unknown-key", "config key data.max_patchs", lambda e: ["umeml", "check", "--data", e.data(),
      "--config", e.config(data={"max_patchs": 3})], 2, "exp.yaml", "data.max_patchs"),
    C("check-config-not-yaml", "config that is not YAML", lambda e: ["umeml", "check", "--data", e.data(),
      "--config", e.config("a: [1,\n")], 2, "exp.yaml", "not valid YAML"),
    C("check-config-list", "config that is a list", lambda e: ["umeml", "check", "--data", e.data(),
      "--config", e.config("- 1\n- 2\n")], 2, "exp.yaml", "expected a mapping"),
    C("check-config-missing", "--config naming no file", lambda e: ["umeml", "check", "--data", e.data(),
      "--config", e.p("none.yaml")], 2, "none.yaml", "cannot read config file"),
    C("check-site-map-missing", "data.site_map naming no file", lambda e: ["umeml", "check", "--data", e.data(),
      "--config", e.config(data={"site_map": e.p("map.csv")})], 2, "data.site_map", "site map not found",
      once=("map.csv",)),
]

RUN_CASES = [
    C("synth-out-file", "umeml synth --out an existing file", lambda e: ["umeml", "synth", "--out", e.file("f")],
      2, "--out", "is a file"),
    C("synth-out-not-empty", "umeml synth into a non-empty folder", lambda e: ["umeml", "synth", "--out",
      e.run_dir()], 2, "run", "not empty", "--overwrite"),
    C("synth-zero-sites", "umeml synth --sites 0", lambda e: ["umeml", "synth", "--out", e.p("s"), "--sites", "0"],
      2, "--sites must be >= 1"),
    C("synth-bad-int", "umeml synth --patients many", lambda e: ["umeml", "synth", "--out", e.p("s"),
      "--patients", "many"], 2, "--patients", "invalid int value"),
    C("synth-unknown-option", "umeml synth --colour 3 (no such option)", lambda e: ["umeml", "synth", "--out", e.p("s"),
      "--colour", "3"], 2, "unrecognized arguments: --colour"),
    C("train-out-run-dir", "umeml train --out a finished run dir", lambda e: ["umeml", "train", "--config",
      e.config(), "--data", e.data(), "--out", e.run_dir()], 2, "run", "holds a finished run", "--overwrite"),
    C("train-overwrite-bad-data", "umeml train --overwrite on a run dir, with bad data", lambda e: ["umeml",
      "train", "--config", e.config(), "--data", e.data(set_cell(0, "censorship", 2)), "--out", e.run_dir(),
      "--overwrite"], 1, "censorship must be 0 or 1"),
    C("train-out-file", "umeml train --out an existing file", lambda e: ["umeml", "train", "--config", e.config(),
      "--data", e.data(), "--out", e.file("f")], 2, "--out", "is a file"),
    C("train-no-config", "umeml train without --config", lambda e: ["umeml", "train", "--data", e.data(), "--out",
      e.p("r")], 2, "umeml train needs --config"),
    C("train-nan-features", "umeml train on a NaN bag", lambda e: ["umeml", "train", "--config", e.config(),
      "--data", e.data(bag_value(np.nan)), "--out", e.p("r")], 1, "TCGA-A0-0000", "NaN/Inf"),
    C("train-empty-config", "umeml train --config of 0 bytes", lambda e: ["umeml", "train", "--config",
      e.config(""), "--data", e.data(), "--out", e.p("r")], 2, "the config file is empty"),
    C("train-n-bins-range", "survival.n_bins 65", lambda e: ["umeml", "train", "--config",
      e.config(survival={"n_bins": 65}), "--data", e.data(), "--out", e.p("r")], 2, "survival.n_bins",
      "must be <= 64"),
    C("train-unknown-model", "model.name resnet", lambda e: ["umeml", "train", "--config",
      e.config(model={"name": "resnet"}), "--data", e.data(), "--out", e.p("r")], 2, "model.name",
      "unknown model 'resnet'"),
    C("train-bad-seed", "umeml train --seed x", lambda e: ["umeml", "train", "--config", e.config(), "--data",
      e.data(), "--out", e.p("r"), "--seed", "x"], 2, "--seed", "invalid int value"),
    C("train-header-only", "umeml train on a header-only table", lambda e: ["umeml", "train", "--config",
      e.config(), "--data", e.data(header_only), "--out", e.p("r")], 1, "the table has no rows"),
    C("report-absent", "umeml report on no folder", lambda e: ["umeml", "report", e.p("absent")], 2, "absent"),
    C("report-file", "umeml report on a file", lambda e: ["umeml", "report", e.file("f.json")], 2, "f.json"),
    C("report-not-run-dir", "umeml report on an empty folder", lambda e: ["umeml", "report", e.data()], 2, "data"),
    C("simulate-out-run-dir", "simulate --out a finished run dir", lambda e: ["umeml-server", "simulate",
      "--config", e.config(), "--data", e.data(), "--out", e.run_dir()], 2, "holds a finished run", "--overwrite",
      "--resume"),
    C("simulate-out-file", "simulate --out an existing file", lambda e: ["umeml-server", "simulate", "--config",
      e.config(), "--data", e.data(), "--out", e.file("f")], 2, "--out", "is a file"),
    C("simulate-n-bins-46", "survival.n_bins 50 in a federation", lambda e: ["umeml-server", "simulate",
      "--config", e.config(survival={"n_bins": 50}), "--data", e.data(), "--out", e.p("r")], 2, "exp.yaml",
      "survival.n_bins", "<= 46"),
    C("simulate-no-config", "simulate without --config", lambda e: ["umeml-server", "simulate", "--out", e.p("r")],
      2, "umeml-server simulate needs --config"),
    C("simulate-empty-config", "simulate --config of 0 bytes", lambda e: ["umeml-server", "simulate", "--config",
      e.config(""), "--data", e.data(), "--out", e.p("r")], 2, "the config file is empty"),
    C("simulate-header-only", "simulate on a header-only table", lambda e: ["umeml-server", "simulate", "--config",
      e.config(), "--data", e.data(header_only), "--out", e.p("r")], 1, "the table has no rows"),
    C("simulate-nan-features", "simulate on a NaN bag", lambda e: ["umeml-server", "simulate", "--config",
      e.config(), "--data", e.data(bag_value(np.inf)), "--out", e.p("r")], 1, "TCGA-A0-0000", "NaN/Inf"),
    C("simulate-dp-epsilon", "simulate --dp-epsilon -1", lambda e: ["umeml-server", "simulate", "--config",
      e.config(), "--data", e.data(), "--dp-epsilon", "-1", "--out", e.p("r")], 2, "--dp-epsilon", "> 0"),
    C("simulate-strategy", "simulate --strategy fedsgd", lambda e: ["umeml-server", "simulate", "--config",
      e.config(), "--strategy", "fedsgd", "--out", e.p("r")], 2, "--strategy", "invalid choice"),
    C("simulate-resume-missing", "simulate --resume a folder that is no run", lambda e: ["umeml-server",
      "simulate", "--resume", e.p("gone")], 2, "--resume", "gone", "not found"),
    C("start-out-run-dir", "start --out a finished run dir", lambda e: ["umeml-server", "start", "--config",
      e.config(), "--sites", "2", "--out", e.run_dir()], 2, "holds a finished run", "--overwrite"),
    C("start-out-file", "start --out an existing file", lambda e: ["umeml-server", "start", "--config", e.config(),
      "--sites", "2", "--out", e.file("f")], 2, "--out", "is a file"),
    C("start-n-bins-46", "start with survival.n_bins 50", lambda e: ["umeml-server", "start", "--config",
      e.config(survival={"n_bins": 50}), "--sites", "2", "--out", e.p("r")], 2, "survival.n_bins", "<= 46"),
    C("start-no-sites", "start without --sites", lambda e: ["umeml-server", "start", "--config", e.config()], 2,
      "the following arguments are required: --sites"),
    C("start-empty-config", "start --config of 0 bytes", lambda e: ["umeml-server", "start", "--config",
      e.config(""), "--sites", "2", "--out", e.p("r")], 2, "the config file is empty"),
    C("start-tls-missing", "start --tls-dir of an empty folder", lambda e: ["umeml-server", "start", "--config",
      e.config(), "--sites", "2", "--out", e.p("r"), "--tls-dir", e.data(remove("bags"))], 2, "TLS files missing", "ca.crt"),
    C("certs-out-file", "certs --out an existing file", lambda e: ["umeml-server", "certs", "--out", e.file("f"),
      "--sites", "A0"], 2, "--out", "is a file"),
    C("certs-site-escapes", "certs --sites ../evil", lambda e: ["umeml-server", "certs", "--out", e.p("pki"),
      "--sites", "../evil"], 2, "../evil"),
]

SITE_CASES = [
    C("client-check-site-escapes", "site file with site_id ../../etc", lambda e: ["umeml-client", "check",
      "--site", e.site(site_id="../../etc")], 2, "site.yaml", "site_id", "must be a file name"),
    C("client-check-empty-site", "site file of 0 bytes", lambda e: ["umeml-client", "check", "--site",
      e.site(text="")], 2, "site.yaml", "is empty"),
    C("client-check-data-missing", "site file whose data_dir does not exist", lambda e: ["umeml-client", "check",
      "--site", e.site(data=e.p("nowhere"))], 2, "data_dir", "nowhere", "not found"),
    C("client-check-unknown-key", "site file with key dataset", lambda e: ["umeml-client", "check", "--site",
      e.site(dataset="x")], 2, "site.yaml", "dataset"),
    C("client-check-nan", "site data with a NaN bag", lambda e: ["umeml-client", "check", "--site",
      e.site(data=e.data(bag_value(np.nan)))], 1, "site A0", "NaN/Inf"),
    C("client-check-header-only", "site table with no rows", lambda e: ["umeml-client", "check", "--site",
      e.site(data=e.data(header_only))], 1, "the table has no rows"),
    C("client-check-empty-config", "client check --config of 0 bytes", lambda e: ["umeml-client", "check",
      "--site", e.site(), "--config", e.config("")], 2, "the config file is empty"),
    C("client-check-site-missing", "--site naming no file", lambda e: ["umeml-client", "check", "--site",
      e.p("none.yaml")], 2, "none.yaml", "cannot read"),
    C("client-start-nan", "client start with a NaN bag", lambda e: ["umeml-client", "start", "--site",
      e.site(data=e.data(bag_value(np.nan))), "--server", "127.0.0.1:9"], 1, "not joining", "NaN/Inf"),
    C("client-start-site-escapes", "client start with site_id ../../etc", lambda e: ["umeml-client", "start",
      "--site", e.site(site_id="../../etc"), "--server", "127.0.0.1:9"], 2, "site_id", "must be a file name"),
    C("client-start-slide-escapes", "client start with slide_id ../../etc/passwd", lambda e: ["umeml-client",
      "start", "--site", e.site(data=e.data(set_cell(0, "slide_id", "../../etc/passwd"))), "--server",
      "127.0.0.1:9"], 1, "not joining", "../../etc/passwd", "must be a file name"),
    C("client-start-bad-server", "client start --server without a port", lambda e: ["umeml-client", "start",
      "--site", e.site(), "--server", "hub"], 2, "--server"),
    C("client-start-key-no-tls", "client start --auth-key without --root-certificates", lambda e: [
      "umeml-client", "start", "--site", e.site(), "--server", "127.0.0.1:9", "--auth-key", e.file("k")], 2,
      "--auth-key needs --root-certificates"),
    C("extract-out-file", "extract --out an existing file", lambda e: ["umeml-client", "extract", "--slides",
      e.p("slides"), "--out", e.file("f"), "--encoder", "vit_tiny", "--random-init"], 2, "--out", "is a file"),
    C("extract-no-slides", "extract from a folder without slides", lambda e: ["umeml-client", "extract",
      "--slides", e.data(), "--out", e.p("feats"), "--encoder", "vit_tiny", "--random-init"], 2,
      "no slide files found in", "data"),
    C("extract-weights-and-random", "extract --weights with --random-init", lambda e: ["umeml-client", "extract",
      "--slides", e.p("s"), "--out", e.p("o"), "--encoder", "vit_tiny", "--weights", "w.pth", "--random-init"],
      2, "--weights and --random-init exclude each other"),
    C("extract-no-encoder", "extract without --encoder", lambda e: ["umeml-client", "extract", "--slides",
      e.p("s"), "--out", e.p("o")], 2, "--encoder"),
    C("extract-patch-size-0", "extract --patch-size 0", lambda e: ["umeml-client", "extract", "--slides",
      e.p("s"), "--out", e.p("o"), "--encoder", "vit_tiny", "--patch-size", "0"], 2, "--patch-size"),
]

CASES = DATA_CASES + RUN_CASES + SITE_CASES


# ------------------------------------------------------------------ running one row
class AcceptedInput(Exception):
    """Raised by the guards: the command accepted the row's input and went on to real work."""


def _refuse(*_a, **_k):
    raise AcceptedInput("the command accepted this input and started its work")


@contextlib.contextmanager
def guarded():
    """Replace the work each command starts on accepted input by :func:`_refuse`."""
    import umeml.client.extract.pipeline as pipeline
    import umeml.client.site_cli as site_cli
    import umeml.server.cli as server_cli
    import umeml.simulation as simulation
    import umeml.simulation.compare as compare
    import umeml.train.central as central

    with contextlib.ExitStack() as stack:
        for target, name in ((central, "train_central"), (simulation, "simulate"), (compare, "compare"),
                             (server_cli, "_run_deployment"), (pipeline, "extract_slides")):
            stack.enter_context(mock.patch.object(target, name, _refuse))
        stack.enter_context(mock.patch.object(site_cli, "subprocess", argparse.Namespace(Popen=_refuse, PIPE=-1, STDOUT=-2)))
        yield


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    """What one row did."""

    code: int | None
    text: str
    escaped: str = ""  # an exception that escaped main(), as "Type: message"
    changed: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)  # warnings that would reach the console

    @property
    def traceback(self) -> bool:
        return bool(self.escaped) or "Traceback" in self.text


def run_case(case: Case, root: Path, base: Path) -> Outcome:
    """Build the row's input under ``root``, run its command in-process, compare the files."""
    import importlib

    argv = case.argv(Env(root, base))
    before = snapshot(root)
    out, err = io.StringIO(), io.StringIO()
    code, escaped = None, ""
    main = importlib.import_module(MAINS[argv[0]]).main
    with guarded(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([str(a) for a in argv[1:]])
        except SystemExit as exc:  # a main() that lets argparse exit
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - recorded: the row fails on it
            escaped = f"{type(exc).__name__}: {exc}"
    after = snapshot(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    new = sorted(set(after) - set(before))
    # deprecation warnings of imported libraries are the console's business (issue 15 item 4), not input's
    warned = [f"{w.category.__name__}: {w.message}" for w in caught
              if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return Outcome(code, out.getvalue() + err.getvalue(), escaped, changed, new, warned)


def problems(case: Case, got: Outcome) -> list[str]:
    """Why the row fails (empty when it passes)."""
    found = []
    if got.escaped:
        found.append(f"exception escaped main(): {got.escaped}")
    if got.code != case.code:
        found.append(f"exit code {got.code}, expected {case.code}")
    found += [f"missing {f!r}" for f in case.fragments if f not in got.text]
    found += [f"should not say {f!r}" for f in case.absent if f in got.text]
    found += [f"{f!r} appears {got.text.count(f)} times, expected once" for f in case.once if got.text.count(f) != 1]
    if "Traceback" in got.text:
        found.append("printed a traceback")
    if got.changed:
        found.append(f"changed or removed {got.changed}")
    if got.new:
        found.append(f"wrote new files {got.new}")
    if got.warned:
        found.append(f"emitted warnings {got.warned}")
    return found


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("battery") / "cohort"
    generate(SPEC, out)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, base, tmp_path):
    got = run_case(case, tmp_path / "case", base)
    assert not problems(case, got), f"{case.what}: {problems(case, got)}\n--- output:\n{got.text}"


def test_battery_is_large_and_ids_unique():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {1, 2}


def test_unchanged_inputs_pass(base, tmp_path, capsys):
    """The rows' inputs differ from a valid one only by their edit: the unedited cohort passes."""
    from umeml.cli import main
    from umeml.client.cli import main as client_main

    env = Env(tmp_path, base)
    assert main(["check", "--data", env.data(), "--config", env.config()]) == 0
    assert client_main(["check", "--site", env.site(data=env.p("data"))]) == 0
    assert "check OK" in capsys.readouterr().out


def test_accepted_input_reaches_the_guard(base, tmp_path):
    """A good input runs into the guard: a row whose command accepted its input cannot pass."""
    case = C("good", "a valid train", lambda e: ["umeml", "train", "--config", e.config(), "--data", e.data(),
             "--out", e.p("r")], 0, "")
    got = run_case(case, tmp_path / "case", base)
    assert got.code == 3 and "internal error, please report" in got.text and problems(case, got)


def test_internal_error_is_one_line_and_a_log(base, tmp_path, monkeypatch, capsys):
    """A bug (here: an unexpected TypeError inside a check) prints one line naming the log that holds
    the traceback; exit code 3."""
    from umeml.cli import main
    from umeml.data.source import CohortSource

    def broken(*_a, **_k):
        raise TypeError("a bug, not an input")

    monkeypatch.setattr(CohortSource, "load", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["check", "--data", Env(tmp_path, base).data()]) == 3
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("umeml: internal error, please report: ") and "Traceback" not in captured.out + captured.err
    log = Path(line.rsplit(": ", 1)[1])
    text = log.read_text()
    assert log.parent == tmp_path and "Traceback" in text and "TypeError: a bug, not an input" in text
    assert "command line: umeml check --data" in text


def test_overwrite_replaces_only_the_earlier_run(base, tmp_path):
    """--overwrite, once the config and data pass, says what it removes and removes only that."""
    env = Env(tmp_path, base)
    run = Path(env.run_dir())
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    case = C("overwrite", "", lambda e: ["umeml", "train", "--config", e.config(), "--data", e.data(), "--out",
                                         str(run), "--overwrite"], 0, "")
    got = run_case(case, tmp_path, base)
    assert "--overwrite: replacing the earlier run in" in got.text and "removing final.json, metrics.csv" in got.text
    assert sorted(p.name for p in run.iterdir()) == ["data", "notes.txt"]
    assert got.code == 3  # then training starts, which the guard stops


def test_existing_outputs_finds_nested_runs(tmp_path):
    from umeml.rundir import RunDir

    assert RunDir(tmp_path / "absent").existing_outputs() == []
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "final.json").write_text("{}")  # a simulation's input folder is not output
    assert RunDir(tmp_path).existing_outputs() == []
    (tmp_path / "holdout-A0").mkdir()
    (tmp_path / "holdout-A0" / "resume.pt").write_bytes(b"")
    (tmp_path / "comparison.json").write_text("{}")
    assert RunDir(tmp_path).existing_outputs() == ["comparison.json", "holdout-A0/"]


def test_feature_scan_is_chunked_and_shows_progress_on_large_cohorts(base, tmp_path, monkeypatch, capsys):
    from umeml.cli import main
    from umeml.data import cohort
    from umeml.data.bags import count_nonfinite

    path = tmp_path / "b.h5"
    feats = np.zeros((20, 3), np.float32)
    feats[10, 1], feats[11, 0], feats[17, 2] = np.nan, np.inf, -np.inf
    with h5py.File(path, "w") as f:
        f["features"] = feats
    assert count_nonfinite(path, chunk_rows=4) == (3, 10) and count_nonfinite(path) == (3, 10)
    feats[:] = 0
    with h5py.File(path, "w") as f:
        f["features"] = feats
    assert count_nonfinite(path, chunk_rows=3) == (0, None)
    env = Env(tmp_path, base)
    data = env.data()
    assert main(["check", "--data", data]) == 0 and "scanning patch features" not in capsys.readouterr().err
    monkeypatch.setattr(cohort, "SCAN_PROGRESS_VALUES", 1)  # every cohort is "large"
    assert main(["check", "--data", data]) == 0 and "scanning patch features" in capsys.readouterr().err


def test_doc_lists_every_row():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    assert all(f"`{c.id}`" in doc for c in CASES), "docs/bad_inputs.md is stale: rerun this file with --write"


@pytest.mark.parametrize("argv, code, fragment", [
    (["umeml", "check", "--data", "{tmp}/nowhere"], 2, "not found"),
    (["umeml-server", "simulate", "--config", "{tmp}/empty.yaml"], 2, "the config file is empty"),
    (["umeml-client", "check", "--site", "{tmp}/empty.yaml"], 2, "is empty"),
])
def test_console_scripts_follow_the_rule(argv, code, fragment, tmp_path):
    """The installed entry points exit with the codes main() returns, without a traceback."""
    (tmp_path / "empty.yaml").write_text("")
    exe = Path(sys.executable).with_name(argv[0])
    res = subprocess.run([str(exe)] + [a.format(tmp=tmp_path) for a in argv[1:]], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == code and fragment in res.stderr and "Traceback" not in res.stderr + res.stdout


# ------------------------------------------------------------------ the docs table
def _first_message(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if "error:" in ln]
    lines = lines[errors[0]:] if errors else lines  # argparse prints its usage first
    shown = " / ".join(lines[:3])
    return (shown[:220] + " ...") if len(shown) > 220 else shown


def write_doc(path: Path) -> None:
    """Run every row and write the table with the measured totals to ``path``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "cohort"
        generate(SPEC, base)
        results = [(c, run_case(c, Path(tmp) / c.id, base)) for c in CASES]
    passed = sum(not problems(c, got) for c, got in results)
    tracebacks = sum(got.traceback for _, got in results)
    changed = sum(len(got.changed) for _, got in results)
    rows = []
    for c, got in results:
        msg = _first_message(got.text.replace(f"{tmp}/{c.id}/", "")).replace("|", "\\|")
        rows.append(f"| `{c.id}` | {c.what} | `{_cmd(c)}` | {got.code} | {msg} |")
    head = [
        "# Bad inputs: what each command says", "",
        "Generated by `python tests/test_bad_inputs.py --write docs/bad_inputs.md` from the table that",
        "`tests/test_bad_inputs.py` runs (fast tier). Exit codes: 0 done, 1 data problem (every problem",
        "listed at once), 2 usage error (the command line, or a file it names, is wrong); see README,",
        "\"Errors and exit codes\". Paths in messages are shown relative to each row's folder.", "",
        f"Measured: **{len(results)} inputs**, {passed} of them ({passed / len(results):.0%}) refused with "
        f"the expected exit code and a message naming the file, field or row and the rule; "
        f"**{tracebacks} tracebacks**; **{changed} earlier files changed** (each row hashes every file of its "
        "folder, a finished run dir included, before and after).", "",
        "| row | input | command | exit | message (first lines) |", "| --- | --- | --- | --- | --- |",
    ]
    path.write_text("\n".join(head + rows) + "\n")
    print(f"{len(results)} inputs, {passed} as expected, {tracebacks} tracebacks, {changed} files changed")
    for c, got in results:
        if problems(c, got):
            print(f"  {c.id}: {problems(c, got)}")


def _cmd(case: Case) -> str:
    return {"umeml": "umeml", "umeml-server": "umeml-server", "umeml-client": "umeml-client"}[
        case.argv(_Names()).__getitem__(0)] + " " + " ".join(case.argv(_Names())[1:2])


class _Names(Env):
    """An Env that builds nothing: only the command's name and subcommand are read from it."""

    def __init__(self):
        pass

    def p(self, name):
        return name

    def data(self, *edits, name="data"):
        return name

    def file(self, name, text="x"):
        return name

    def config(self, text=None, name="exp.yaml", **sections):
        return name

    def run_dir(self, name="run"):
        return name

    def site(self, data=None, text=None, name="site.yaml", **keys):
        return name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="run the bad-input battery and write its table")
    parser.add_argument("--write", type=Path, required=True, help="markdown file to write (docs/bad_inputs.md)")
    write_doc(parser.parse_args().write)

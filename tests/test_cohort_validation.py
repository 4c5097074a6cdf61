"""Every bad input named in the foundation issue is reported, with file, row/slide and rule."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from umeml.config import DataConfig
from umeml.data.bags import write_bag
from umeml.data.cohort import load_data_dir
from umeml.errors import DataValidationError


@pytest.fixture
def data_dir(tiny_cohort_dir, tmp_path):
    out = tmp_path / "cohort"
    shutil.copytree(tiny_cohort_dir, out)
    return out


def table(d):
    return pd.read_csv(d / "table.csv", dtype={"slide_id": str, "site": str})


def save(d, df):
    df.to_csv(d / "table.csv", index=False)


def problems_of(d, cfg=None):
    with pytest.raises(DataValidationError) as err:
        load_data_dir(d, cfg)
    return [str(p) for p in err.value.problems]


def with_slide(df):
    return df[df["slide_id"].notna() & (df["slide_id"] != "")]


def test_clean_cohort_loads(tiny_cohort_dir):
    cohort = load_data_dir(tiny_cohort_dir)
    assert len(cohort) == 60
    assert cohort.feature_dim == 16
    assert not cohort.has_path.all() and cohort.has_path.sum() > 50
    assert not cohort.has_genomics.all() and cohort.has_genomics.sum() > 50


def test_missing_column(data_dir):
    save(data_dir, table(data_dir).drop(columns=["censorship"]))
    (msg,) = problems_of(data_dir)
    assert "table.csv" in msg and "missing required column censorship: the task survival needs it" in msg


def test_survival_and_label_problems_are_collected_together(data_dir):
    df = table(data_dir)
    df.loc[0, "survival_months"] = -1
    df.loc[3, "survival_months"] = np.nan
    df.loc[5, "oncotree_code"] = "XYZ"
    df.loc[7, "censorship"] = 2
    save(data_dir, df)
    msgs = problems_of(data_dir)
    joined = "\n".join(msgs)
    assert "row 2" in joined and "survival_months must be >= 0 (got -1.0)" in joined
    assert "row 5" in joined and "survival_months is missing" in joined
    assert "row 7" in joined and "oncotree_code 'XYZ' is not a known subtype" in joined
    assert "row 9" in joined and "censorship must be 0 or 1" in joined
    assert all("table.csv" in m for m in msgs)


def test_conflicting_labels_for_one_case(data_dir):
    df = table(data_dir)
    two = df[df.duplicated("case_id", keep=False)]
    case = two["case_id"].iloc[0]
    idx = two.index[1]
    df.loc[idx, "oncotree_code"] = "GBM" if df.loc[idx, "oncotree_code"] != "GBM" else "ODG"
    save(data_dir, df)
    msgs = problems_of(data_dir)
    assert any(f"case {case}" in m and "conflicting oncotree_code" in m for m in msgs)


def test_conflicting_genomics_for_one_case_and_only_for_it(data_dir):
    df = table(data_dir)
    col = [c for c in df.columns if c.endswith("_rnaseq")][0]
    two = df[df.duplicated("case_id", keep=False) & df[col].notna()]
    case, idx = two["case_id"].iloc[0], two.index[1]
    df.loc[idx, col] = df.loc[idx, col] + 1.0
    single = df[~df.duplicated("case_id", keep=False) & df[col].notna()].index[0]
    df.loc[single, col] = df.loc[single, col] + 1.0  # one row: nothing to conflict with
    save(data_dir, df)
    msgs = [m for m in problems_of(data_dir) if "conflicting genomic values" in m]
    assert len(msgs) == 1 and f"case {case}" in msgs[0], msgs


def test_genomic_nan_error_then_imputation(data_dir):
    df = table(data_dir)
    col = [c for c in df.columns if c.endswith("_rnaseq")][0]
    row = df[df[col].notna()].index[0]
    df.loc[row, col] = np.inf
    save(data_dir, df)
    msgs = problems_of(data_dir)
    assert any(col in m and "NaN/Inf genomic value" in m for m in msgs)
    cohort = load_data_dir(data_dir, DataConfig(genomic_nan_policy="impute_median"))
    assert cohort.imputed_values == 1
    assert np.isfinite(cohort.genomics).all()


def test_patient_without_genomics_is_explicit_not_error(tiny_cohort_dir):
    cohort = load_data_dir(tiny_cohort_dir)
    missing = np.where(~cohort.has_genomics)[0]
    assert len(missing) >= 1


def test_bag_problems(data_dir):
    df = with_slide(table(data_dir))
    slides = df["slide_id"].tolist()
    bags = data_dir / "bags"
    # truncated file
    p = bags / f"{slides[0]}.h5"
    p.write_bytes(p.read_bytes()[:300])
    # missing dataset
    with h5py.File(bags / f"{slides[1]}.h5", "a") as f:
        del f["coords"]
    # wrong feature dim
    write_bag(bags / f"{slides[2]}.h5", np.zeros((5, 8)), np.zeros((5, 2)), {"encoder": "synthetic"})
    # empty bag
    write_bag(bags / f"{slides[3]}.h5", np.zeros((0, 16)), np.zeros((0, 2)), {"encoder": "synthetic"})
    # slide without features
    (bags / f"{slides[4]}.h5").unlink()
    # features without slide
    write_bag(bags / "TCGA-ZZ-9999-01Z-00-DX1.h5", np.zeros((5, 16)), np.zeros((5, 2)), {"encoder": "synthetic"})
    # other encoder
    write_bag(bags / f"{slides[5]}.h5", np.ones((5, 16)), np.zeros((5, 2)), {"encoder": "resnet50_trunc"})
    msgs = problems_of(data_dir)
    joined = "\n".join(msgs)
    assert f"{slides[0]}.h5" in joined and "unreadable or truncated" in joined
    assert f"{slides[1]}.h5" in joined and "missing dataset 'coords'" in joined
    assert f"{slides[2]}.h5" in joined and "feature dim 8 differs" in joined
    assert f"{slides[3]}.h5" in joined and "empty bag" in joined
    assert f"slide {slides[4]}" in joined and "has no feature bag" in joined
    assert "TCGA-ZZ-9999-01Z-00-DX1.h5" in joined and "no row in the table" in joined
    assert f"{slides[5]}.h5" in joined and "encoder 'resnet50_trunc' differs" in joined
    assert len(msgs) == 7


def test_table_and_bag_problems_in_one_run(data_dir):
    """Acceptance: one truncated h5 and one survival of -1 are both named in one run."""
    df = table(data_dir)
    slide = with_slide(df)["slide_id"].iloc[0]
    p = data_dir / "bags" / f"{slide}.h5"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    df.loc[1, "survival_months"] = -1
    save(data_dir, df)
    joined = "\n".join(problems_of(data_dir))
    assert "survival_months must be >= 0" in joined and slide in joined


def test_duplicate_slide_rows(data_dir):
    df = table(data_dir)
    save(data_dir, pd.concat([df, df.iloc[[0]]]))
    assert any("appears on more than one row" in m for m in problems_of(data_dir))


def test_unreadable_table(tmp_path):
    (tmp_path / "table.csv").write_bytes(b"\x00\xff\xfe garbage")
    msgs = problems_of(tmp_path)
    assert "table.csv" in msgs[0]


def test_site_map_merges_codes(tiny_cohort_dir, tmp_path):
    site_map = tmp_path / "sites.csv"
    site_map.write_text("code,institution\nA0,North\nA1,North\nA2,South\n")
    cohort = load_data_dir(tiny_cohort_dir, DataConfig(site_map=str(site_map)))
    assert cohort.sites == ["North", "South"]

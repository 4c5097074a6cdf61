"""The real TCGA GBM-LGG table (genomics only) passes through the data layer intact."""

import pytest

from umeml.config import DataConfig
from umeml.data.cohort import load_cohort
from umeml.data.splits import site_kfold


@pytest.fixture(scope="module")
def real(tcga_dir):
    return load_cohort(tcga_dir / "tcga_gbmlgg_all_clean.csv.gz", tcga_dir / "signatures.csv")


def test_counts(real):
    s = real.summary()
    assert s["patients"] == 569
    assert s["slides"] == 1011
    assert s["sites"] == 35
    assert len(real.subtypes) == 6 and all(v > 0 for v in s["subtype_counts"].values())
    assert s["table_genomic_columns"] == 1590
    assert s["grade_counts"] == {"II": 287, "III": 192, "IV": 90}
    assert s["with_pathology"] == 0 and s["with_genomics"] == 569
    assert len(s["gene_groups"]) == 6


def test_sites_keep_leading_zero(real):
    sizes = real.summary()["patients_per_site"]
    assert sizes["HT"] == 100 and sizes["DU"] == 84 and sizes["06"] == 40


def test_flat_mode_uses_every_genomic_column(tcga_dir):
    flat = load_cohort(tcga_dir / "tcga_gbmlgg_all_clean.csv.gz", None, None, DataConfig(genomics_mode="flat"))
    assert flat.gene_groups.sizes == (1590,)


def test_site_folds_cover_everyone(real):
    folds = site_kfold(real, 5, seed=0)
    sizes = [len(t) for _, t in folds]
    assert sum(sizes) == 569 and max(sizes) - min(sizes) < 60

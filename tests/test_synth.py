import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from umeml.data.bags import inspect_bag
from umeml.data.cohort import load_data_dir
from umeml.data.synth import SynthSpec, generate

SMALL = SynthSpec(sites=2, patients=8, seed=11, feature_dim=8, median_patches=20, min_patches=4, max_patches=60)


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix != ".h5":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def bag_arrays(folder):
    from umeml.data.bags import read_coords, read_features

    return [(p.name, read_features(p), read_coords(p)) for p in sorted((folder / "bags").glob("*.h5"))]


def test_cohort_is_a_pure_function_of_its_seed(tmp_path):
    generate(SMALL, tmp_path / "a")
    generate(SMALL, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    for (na, fa, ca), (nb, fb, cb) in zip(bag_arrays(tmp_path / "a"), bag_arrays(tmp_path / "b")):
        assert na == nb and np.array_equal(fa, fb) and np.array_equal(ca, cb)
    generate(SynthSpec(**{**SMALL.__dict__, "seed": 12}), tmp_path / "c")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_written_formats(tiny_cohort_dir):
    df = pd.read_csv(tiny_cohort_dir / "table.csv", dtype={"slide_id": str})
    assert df["case_id"].str.match(r"^TCGA-[A-Z0-9]{2}-\d{4}$").all()
    assert set(df["oncotree_code"]) <= {"ASTR", "OAST", "ODG", "AASTR", "AOAST", "GBM"}
    assert set(df["censorship"]) == {0, 1}
    assert (df["survival_months"] > 0).all()
    sig = pd.read_csv(tiny_cohort_dir / "signatures.csv")
    assert sig.shape[1] == 6
    info = inspect_bag(next((tiny_cohort_dir / "bags").glob("*.h5")))
    assert info.feature_dim == 16 and info.dtype == "float16" and info.attrs["schema_version"] == 1
    oracle = json.loads((tiny_cohort_dir / "oracle.json").read_text())
    assert {"subtype", "grade", "survival"} <= set(oracle)
    assert 0.5 < oracle["survival"]["c_index"] <= 1.0


def test_cohort_has_the_promised_structure(tiny_cohort_dir):
    cohort = load_data_dir(tiny_cohort_dir)
    s = cohort.summary()
    assert s["sites"] == 3 and s["patients"] == 60
    assert s["with_pathology"] < 60 and s["with_genomics"] < 60
    sizes = [sum(cohort.bag_patches[x] for x in p.slide_ids) for p in cohort.patients if p.slide_ids]
    assert max(sizes) / min(sizes) >= 5  # bag sizes vary widely
    assert any(len(p.slide_ids) == 2 for p in cohort.patients)
    props = [np.bincount([cohort.subtype_index(i) for i in cohort.site_indices(site)], minlength=6) / 20
             for site in cohort.sites]
    assert np.abs(props[0] - props[1]).sum() > 0.1  # label shift across sites


def test_stain_shift_separates_sites(tiny_cohort_dir):
    from umeml.data.bags import read_features

    cohort = load_data_dir(tiny_cohort_dir)
    means = {}
    for site in cohort.sites:
        feats = [read_features(f).mean(axis=0) for i in cohort.site_indices(site) for f in cohort.bag_files(i)]
        means[site] = np.mean(feats, axis=0)
    a, b = list(means.values())[:2]
    assert np.linalg.norm(a - b) > 0.05


def test_refuses_to_overwrite_and_checks_options(tmp_path):
    generate(SMALL, tmp_path / "x")
    with pytest.raises(FileExistsError):
        generate(SMALL, tmp_path / "x")
    generate(SMALL, tmp_path / "x", overwrite=True)
    with pytest.raises(ValueError, match="--sites"):
        generate(SynthSpec(sites=0), tmp_path / "y")
    assert not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".*partial*"))


# sha256 of SMALL's files (bags: their features and coords) as generated before the clustered
# option existed: the default cohort must stay byte-identical
SMALL_SHA256 = "16b000fe18aae22c650eefef854807a5be66d066ed21a769df3e78829f2ad27e"


def full_digest(folder):
    from umeml.data.bags import read_coords, read_features

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(read_features(p).tobytes() + read_coords(p).tobytes() if p.suffix == ".h5" else p.read_bytes())
    return h.hexdigest()


def test_default_cohort_is_unchanged_by_the_clustered_option(tmp_path):
    generate(SMALL, tmp_path / "a")
    assert full_digest(tmp_path / "a") == SMALL_SHA256
    assert "clustered" not in json.loads((tmp_path / "a" / "synth.json").read_text())


def _same_kind_neighbours(kinds, cells):
    """Share of grid-adjacent patch pairs (right neighbour) of the same morphotype."""
    where = {tuple(c): k for c, k in zip(cells.tolist(), kinds.tolist())}
    pairs = [(k, where[(x + 1, y)]) for (x, y), k in where.items() if (x + 1, y) in where]
    return float(np.mean([a == b for a, b in pairs]))


def test_clustered_morphotypes_are_spatially_clustered(tmp_path):
    from umeml.data.synth import mosaic_kinds

    rng = np.random.default_rng(0)
    mix = np.full(8, 1 / 8)
    kinds, region, cells = mosaic_kinds(1600, mix, rng)
    assert len(np.unique(region)) == 40 and len(kinds) == len(cells) == 1600
    clustered = _same_kind_neighbours(kinds, cells)
    shuffled = _same_kind_neighbours(rng.permutation(kinds), cells)
    assert clustered > 0.8 and shuffled < 0.3  # i.i.d. placement: about 1/8 of neighbours agree
    spec = SynthSpec(**{**SMALL.__dict__, "clustered": True})
    generate(spec, tmp_path / "c")
    assert full_digest(tmp_path / "c") != SMALL_SHA256
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["clustered"] is True
    cohort = load_data_dir(tmp_path / "c")
    assert len(cohort) == 16 and cohort.feature_dim == 8

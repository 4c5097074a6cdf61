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


# sha256 of SMALL with clustered=True (the "mosaic" variant) as generated before the "foci" variant
# existed: the first clustered cohorts keep their bytes too
SMALL_MOSAIC_SHA256 = "7befd51fe382137d86adcf8c535cd81beea511d718810e4c6179fa2d1e26c304"
FOCI = SynthSpec(sites=2, patients=10, seed=5, feature_dim=32, median_patches=200, min_patches=100,
                 max_patches=400, clustered=True, clustered_variant="foci")


def test_mosaic_cohort_is_unchanged_by_the_foci_variant(tmp_path):
    generate(SynthSpec(**{**SMALL.__dict__, "clustered": True}), tmp_path / "m")
    assert full_digest(tmp_path / "m") == SMALL_MOSAIC_SHA256
    written = json.loads((tmp_path / "m" / "synth.json").read_text())
    assert "clustered_variant" not in written and "tumour_fraction" not in written


def assert_a_pure_function_of_its_seed(spec: SynthSpec, tmp_path) -> None:
    """Two runs of ``spec`` write the same bytes, another seed others; synth.json names the variant."""
    generate(spec, tmp_path / "a")
    generate(spec, tmp_path / "b")
    generate(SynthSpec(**{**spec.__dict__, "seed": 6}), tmp_path / "c")
    assert full_digest(tmp_path / "a") == full_digest(tmp_path / "b") != full_digest(tmp_path / "c")
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["clustered_variant"] == spec.clustered_variant


def test_foci_cohort_is_a_pure_function_of_its_seed(tmp_path):
    assert_a_pure_function_of_its_seed(FOCI, tmp_path)


def test_foci_layout_has_the_tumour_fraction_and_central_necrosis():
    from umeml.data.synth import NECROSIS_CORE, foci_kinds

    rng = np.random.default_rng(1)
    for n, frac in [(400, 0.05), (1000, 0.02), (16, 0.05), (300, 0.5)]:
        kinds, region, cells = foci_kinds(n, frac, np.full(8, 1 / 8), np.full(4, 1 / 4), True, rng)
        tumour = (kinds < 8) | (kinds == 12)
        assert tumour.sum() == max(1, round(frac * n)) and len(cells) == n
        assert set(np.unique(kinds[~tumour])) <= set(range(8, 12))  # background elsewhere
        necrosis = kinds == 12
        assert abs(necrosis.sum() - NECROSIS_CORE * tumour.sum()) <= 3  # rounding, per focus
        for f in np.unique(region[tumour]):  # necrosis is the core of its focus
            focus = tumour & (region == f)
            centre = cells[focus].mean(axis=0)
            dist = np.linalg.norm(cells - centre, axis=1)
            if necrosis[focus].any() and (~necrosis & focus).any():
                assert dist[necrosis & focus].mean() < dist[~necrosis & focus].mean()
    kinds, _, _ = foci_kinds(400, 0.05, np.full(8, 1 / 8), np.full(4, 1 / 4), False, rng)
    assert not (kinds == 12).any()
    with pytest.raises(ValueError, match="tumour-fraction"):
        SynthSpec(clustered=True, tumour_fraction=(0.3, 0.1)).check()
    with pytest.raises(ValueError, match="need clustered"):
        SynthSpec(clustered_variant="foci").check()
    with pytest.raises(ValueError, match="--clustered must be one of"):
        SynthSpec(clustered=True, clustered_variant="stripes").check()


def _recovered_kinds(data_dir, spec):
    """Every bag's patches labelled by their nearest generator centroid (site stain undone), and
    the patients' latent variables, from the written files and the generator's world."""
    from umeml.data.bags import read_coords, read_features
    from umeml.data.synth import _world

    world = _world(spec, np.random.default_rng(spec.seed))
    centroids = np.concatenate([world.centroids, world.background, world.necrosis])
    table = pd.read_csv(data_dir / "table.csv", dtype={"slide_id": str}, keep_default_na=False)
    sites = {code: s for s, code in enumerate(sorted(table["site"].unique()))}
    out = []
    for row in table[table["slide_id"] != ""].itertuples():
        path = data_dir / "bags" / f"{row.slide_id}.h5"
        s = sites[row.site]
        x = (read_features(path) - world.site_offset[s]) / world.site_scale[s]
        kinds = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        out.append((row.case_id, row.oncotree_code, kinds, read_coords(path) // 256))
    return out


def _tumour_neighbours(tumour, cells):
    """Of the tumour patches' right-hand grid neighbours, the share that are tumour."""
    where = {tuple(c): t for c, t in zip(cells.tolist(), tumour.tolist())}
    return [where[(x + 1, y)] for (x, y), t in where.items() if t and (x + 1, y) in where]


def test_foci_tumour_is_a_few_percent_clustered_in_coords_and_necrosis_marks_grade_iv(tmp_path):
    generate(FOCI, tmp_path / "f")
    slides = _recovered_kinds(tmp_path / "f", FOCI)
    rng = np.random.default_rng(0)
    fractions, pairs, shuffled = [], [], []
    for _case, code, kinds, cells in slides:
        tumour = (kinds < 8) | (kinds == 12)
        fractions.append(tumour.mean())
        pairs += _tumour_neighbours(tumour, cells)
        shuffled += _tumour_neighbours(rng.permutation(tumour), cells)
        assert (kinds == 12).any() <= (code == "GBM")  # necrosis only in grade IV
    assert 0.02 - 0.01 <= min(fractions) and max(fractions) <= 0.10 + 0.01  # FOCI_TUMOUR_FRACTION
    assert np.mean(pairs) > 0.4 and np.mean(shuffled) < 0.15  # at random: about the tumour fraction
    assert any((kinds == 12).any() for _case, code, kinds, _ in slides if code == "GBM")


def test_synth_cli_writes_the_foci_variant_and_refuses_a_fraction_without_clustered(tmp_path, capsys):
    from umeml.cli import main

    args = ["synth", "--sites", "1", "--patients", "3", "--feature-dim", "8", "--median-patches", "20"]
    assert main(args + ["--out", str(tmp_path / "a"), "--tumour-fraction", "0.05", "0.1"]) == 2
    assert "need clustered=True (--clustered)" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b"), "--clustered", "foci", "--tumour-fraction", "0.05", "0.1"]) == 0
    written = json.loads((tmp_path / "b" / "synth.json").read_text())
    assert written["clustered_variant"] == "foci" and written["tumour_fraction"] == [0.05, 0.1]
    assert main(args + ["--out", str(tmp_path / "c"), "--clustered"]) == 0
    assert "clustered_variant" not in json.loads((tmp_path / "c" / "synth.json").read_text())


def test_synth_cli_offers_exactly_the_generators_clustered_variants():
    """The CLI spells the variant names itself (it imports synth lazily): keep the lists in step."""
    from umeml.cli import build_parser
    from umeml.data.synth import CLUSTERED_VARIANTS

    parser = build_parser()
    synth = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("synth"))
    clustered = next(a for a in synth._actions if "--clustered" in a.option_strings)
    assert tuple(clustered.choices) == CLUSTERED_VARIANTS
    assert clustered.const in CLUSTERED_VARIANTS


# sha256 of FOCI as generated before the "arrangement" variant existed: foci cohorts keep their bytes
FOCI_SHA256 = "6c1ccbad496868cd9a5348d5774e313b31f59bd869e4bdbbce8ea4f53cf53ae0"
ARRANGEMENT = SynthSpec(**{**FOCI.__dict__, "patients": 24, "clustered_variant": "arrangement"})


def test_older_cohorts_are_unchanged_by_the_arrangement_variant(tmp_path):
    generate(FOCI, tmp_path / "f")
    generate(SynthSpec(**{**SMALL.__dict__, "clustered": True}), tmp_path / "m")
    generate(SMALL, tmp_path / "d")
    assert full_digest(tmp_path / "f") == FOCI_SHA256
    assert full_digest(tmp_path / "m") == SMALL_MOSAIC_SHA256
    assert full_digest(tmp_path / "d") == SMALL_SHA256


def _mostly_tumour_neighbours(tumour, cells):
    """Share of tumour patches whose present 8 grid neighbours are mostly (> half) tumour."""
    where = {tuple(c): t for c, t in zip(cells.tolist(), tumour.tolist())}
    shares = []
    for (x, y), t in where.items():
        around = [where[(x + dx, y + dy)] for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                  if (dx or dy) and (x + dx, y + dy) in where]
        if t and around:
            shares.append(np.mean(around) > 0.5)
    return float(np.mean(shares))


def test_arrangement_layout_carries_the_grade_and_the_shares_do_not():
    from umeml.data.synth import arrangement_kinds

    rng = np.random.default_rng(3)
    mix, background = np.full(8, 1 / 8), np.full(4, 1 / 4)
    stats = {g: [] for g in ("II", "III", "IV")}
    shares = {g: [] for g in stats}
    for g in stats:
        for _ in range(20):
            kinds, region, cells = arrangement_kinds(900, 0.3, g, 0.05, mix, background, rng)
            tumour = kinds < 8
            assert tumour.sum() == 270 and (kinds == 12).sum() == (45 if g == "IV" else 0)
            stats[g].append(_mostly_tumour_neighbours(tumour | (kinds == 12), cells))
            shares[g].append(np.bincount(kinds[tumour], minlength=8) / tumour.sum())
    assert max(stats["II"]) < 0.3 and min(stats["III"]) > 0.7 and min(stats["IV"]) > 0.7
    for g in ("III", "IV"):  # the tumour's morphotype shares: the same mixture at every grade
        assert np.abs(np.mean(shares[g], 0) - np.mean(shares["II"], 0)).max() < 0.02
    kinds, _, cells = arrangement_kinds(900, 0.3, "IV", 0.05, mix, background, rng)
    dist = np.linalg.norm(cells - cells[kinds == 12].mean(0), axis=1)  # necrosis: the core (one mass or more)
    assert (kinds == 12).sum() == 45 and dist[kinds == 12].mean() <= dist[kinds < 8].mean() + 1e-9


def test_arrangement_cohort_is_a_pure_function_of_its_seed_with_lineage_genomics(tmp_path):
    from umeml.data.synth import LINEAGE, SUBTYPES, _world

    assert_a_pure_function_of_its_seed(ARRANGEMENT, tmp_path)
    world = _world(ARRANGEMENT, np.random.default_rng(ARRANGEMENT.seed))
    for s in range(len(SUBTYPES)):  # gene means: the lineage's, whatever the grade
        assert np.array_equal(world.gene_effects[s], world.gene_effects[LINEAGE[s]])
    assert not np.array_equal(world.gene_effects[0], world.gene_effects[1])
    foci = _world(FOCI, np.random.default_rng(FOCI.seed))
    assert not np.array_equal(foci.gene_effects[0], foci.gene_effects[3])  # other variants: per subtype
    slides = _recovered_kinds(tmp_path / "a", ARRANGEMENT)
    for _case, code, kinds, _cells in slides:
        tumour = (kinds < 8).mean()
        assert 0.2 - 0.03 <= tumour <= 0.5 + 0.03
        assert (kinds == 12).any() == (code == "GBM")  # necrosis exactly in grade IV
    from umeml.data.synth import oracle_features

    seen = oracle_features({"mix": np.zeros(8), "expression": np.zeros(3), "necrosis": 0.0,
                            "layout": np.array([0.0, 1.0, 0.0])})
    assert seen.tolist()[-4:] == [0.0, 0.0, 1.0, 0.0]  # the oracle sees the layout the generator used


def test_arrangement_check_messages():
    with pytest.raises(ValueError, match="need clustered"):
        SynthSpec(clustered_variant="arrangement").check()
    with pytest.raises(ValueError, match="tumour-fraction"):
        SynthSpec(clustered=True, clustered_variant="arrangement", tumour_fraction=(0.0, 0.5)).check()
    SynthSpec(clustered=True, clustered_variant="arrangement", tumour_fraction=(0.2, 0.5)).check()

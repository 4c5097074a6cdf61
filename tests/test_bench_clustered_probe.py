"""bench/bench_clustered_probe.py on a tiny foci cohort: the table it prints and writes (one row
per patient summary, grade and subtype AUCs) and a shuffled-label control showing that the
probes' AUCs come from the patients' labels (chance without them)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from bench import bench_clustered_probe as cp
from bench.bench_synthetic import TITLE_CLUSTERED

# small enough for the fast tier, large enough that the morphotype shares separate the classes
TINY = {"sites": 3, "patients": 30, "feature_dim": 16, "median_patches": 80, "min_patches": 16, "max_patches": 300}
ROW = re.compile(r"^\| (.+?) \| (\d\.\d{3}) \((\d\.\d{3})\) \| (\d\.\d{3}) \((\d\.\d{3})\) \|$")


@pytest.fixture(scope="module")
def tiny_summaries():
    """(spec, the probes' view of its cohort): generated once for the module."""
    spec = cp.foci_spec(0, **TINY)
    return spec, cp.patient_summaries(spec)


def test_the_table_has_one_row_per_summary_with_the_probes_numbers(tiny_summaries, monkeypatch, tmp_path, capsys):
    spec, (sites, labels, summaries) = tiny_summaries
    asked = []

    def cached(s):  # main's own cohort of seed 0 is the fixture's, at the tiny size
        asked.append((s.seed, s.clustered_variant, s.tumour_fraction))
        return sites, labels, summaries

    monkeypatch.setattr(cp, "foci_spec", lambda seed, fraction=None: dataclasses.replace(spec, seed=seed,
                                                                                         tumour_fraction=fraction))
    monkeypatch.setattr(cp, "patient_summaries", cached)
    doc = tmp_path / "benchmarks.md"
    assert cp.main(["--seeds", "0", "--write", str(doc)]) == 0
    assert asked == [(0, "foci", None)]
    rows = [m.groups() for m in map(ROW.match, capsys.readouterr().out.splitlines()) if m]
    assert [r[0] for r in rows] == list(summaries)
    for name, grade, grade_sd, subtype, subtype_sd in rows:
        x = summaries[name]
        assert float(grade) == pytest.approx(cp._loso_auc(labels["grade"], x, sites), abs=5e-4)
        assert float(subtype) == pytest.approx(cp._loso_auc(labels["subtype"], x, sites), abs=5e-4)
        assert grade_sd == subtype_sd == "0.000"  # one seed
    text = doc.read_text()
    assert text.startswith(TITLE_CLUSTERED) and cp.HEADING in text
    assert "python -m bench.bench_clustered_probe --seeds 0" in text and "load average before / after" in text


def test_the_probes_read_the_labels_a_shuffled_control_is_at_chance(tiny_summaries):
    _, (sites, labels, summaries) = tiny_summaries
    assert len(sites) == len(labels["grade"]) == len(labels["subtype"])
    assert all(len(x) == len(sites) and np.isfinite(x).all() for x in summaries.values())
    assert np.allclose(summaries["morphotype shares, all patches"].sum(1), 1.0)
    shares = summaries["morphotype shares, tumour patches (+ necrosis)"]
    for task in ("grade", "subtype"):
        real = cp._loso_auc(labels[task], shares, sites)
        shuffled = [cp._loso_auc(labels[task][np.random.default_rng(seed).permutation(len(sites))], shares, sites)
                    for seed in range(5)]
        assert real > 0.7, (task, real)
        assert abs(np.mean(shuffled) - 0.5) < 0.1 and max(shuffled) < real - 0.15, (task, real, shuffled)


def test_the_arrangement_probe_adds_the_layout_row_and_it_reads_the_grade():
    spec = cp.arrangement_spec(0, **TINY)
    sites, labels, summaries = cp.patient_summaries(spec)
    assert list(summaries)[-1] == cp.NEIGHBOURHOOD and summaries[cp.NEIGHBOURHOOD].shape == (len(sites), 1)
    layout = summaries[cp.NEIGHBOURHOOD][:, 0]
    ii, iii = layout[labels["grade"] == 0], layout[labels["grade"] == 1]
    assert ii.mean() < 0.6 < iii.mean()  # scattered vs compact masses
    assert cp._loso_auc(labels["grade"], summaries[cp.NEIGHBOURHOOD], sites) > 0.8
    assert cp.NEIGHBOURHOOD not in cp.patient_summaries(cp.foci_spec(0, **{**TINY, "patients": 4}))[2]
    cells = np.array([[0, 0], [1, 0], [0, 1], [5, 5], [6, 5]])
    assert cp.tumour_neighbour_shares(np.array([1, 1, 0, 1, 0], bool), cells).tolist() == [0.5, 0.5, 0.0]  # (0, 1) diagonal

"""The clustered section of bench_synthetic: reruns keep earlier figures (no silent overwrite)."""

from bench._harness import write_section
from bench.bench_synthetic import TITLE_CLUSTERED, _cache_key, clustered_body

OLD = ("# Benchmarks\n\n" + TITLE_CLUSTERED + " (old)\n\nfoci at 8 epochs\n\n"
       "### Previous generator: mosaic\n\nmosaic figures\n\n## Next section\n\nkept\n")


def _write(path, body, epochs):
    write_section(path, TITLE_CLUSTERED, clustered_body(path, body, epochs), when="today")


def test_reruns_replace_only_their_own_part_of_the_clustered_section(tmp_path):
    path = tmp_path / "b.md"
    path.write_text(OLD)
    _write(path, "foci at 16 epochs", 16)
    text = path.read_text()
    assert text.index("foci at 8 epochs") < text.index("### Training budget --epochs 16") \
        < text.index("foci at 16 epochs") < text.index("### Previous generator") < text.index("mosaic figures")
    _write(path, "foci at 8 epochs, rerun", None)
    _write(path, "foci at 16 epochs, rerun", 16)
    text = path.read_text()
    for kept in ("foci at 8 epochs, rerun", "foci at 16 epochs, rerun", "mosaic figures", "## Next section\n\nkept"):
        assert text.count(kept) == 1
    assert "foci at 16 epochs\n" not in text and "foci at 8 epochs\n" not in text
    assert text.index("### Training budget") < text.index("### Previous generator")


def test_cache_keys_keep_the_first_clustered_records():
    assert [_cache_key(c) for c in (None, "mosaic", "foci")] == [False, True, "foci"]


def test_a_tumour_fraction_run_gets_its_own_subsection(tmp_path):
    path = tmp_path / "b.md"
    path.write_text(OLD)
    write_section(path, TITLE_CLUSTERED, clustered_body(path, "sweep", None, (0.1, 0.25)), when="today")
    text = path.read_text()
    assert "### Run with --tumour-fraction 0.1 0.25\n\nsweep" in text and "foci at 8 epochs" in text
    assert text.index("sweep") < text.index("### Previous generator")


def test_a_spatial_run_gets_its_own_subsection_and_keeps_the_main_text(tmp_path):
    from bench.bench_synthetic import spatial_heading

    path = tmp_path / "b.md"
    path.write_text(OLD)
    assert spatial_heading("foci", {"umeml": {}, "umeml -cross-attention": {}}, None, None) is None
    heading = spatial_heading("foci", {"umeml +spatial": {}}, 16, (0.1, 0.25))
    assert heading == ("### Spatial context (`model.spatial_context: neighbours`), foci cohort, "
                       "--tumour-fraction 0.1 0.25, --epochs 16")
    write_section(path, TITLE_CLUSTERED, clustered_body(path, "spatial figures", None, heading=heading), when="today")
    text = path.read_text()
    assert "foci at 8 epochs" in text and f"{heading}\n\nspatial figures" in text
    assert text.index("spatial figures") < text.index("### Previous generator")


def test_paired_gain_against_the_seed_sd():
    from bench.bench_synthetic import pooling_goal

    seeds = range(4)
    mean = {k: {"grade": 0.5 + 0.01 * k, "subtype": 0.6, "survival": None} for k in seeds}
    spatial = {k: {"grade": 0.7 + 0.01 * k, "subtype": (0.56, 0.64, 0.6, 0.6)[k], "survival": None} for k in seeds}
    text = pooling_goal({"umeml -cross-attention": mean, "umeml +spatial": spatial, "umeml": mean,
                         "umeml +spatial -cross-attention": mean})
    lines = text.split("\n\n")
    assert lines[0].startswith("Goal UMEML > mean pooling") and "grade: +0.000" in lines[0]
    # with spatial context the goal pair is the one where both models see the neighbourhoods
    goal = next(line for line in lines if line.startswith("Goal `umeml +spatial` - `umeml +spatial -cross-attention`"))
    assert [line.split(" (")[0] for line in lines if line.startswith("Goal `")] == [
        "Goal `umeml +spatial` - `umeml +spatial -cross-attention`"]
    assert any(line.startswith("`umeml +spatial` - `umeml -cross-attention`") for line in lines)
    assert "grade: +0.200 (seed sd 0.011 / 0.011, paired sd 0.000, ahead in 4 of 4 seeds; met)" in goal
    assert "subtype: +0.000 (seed sd 0.028 / 0.000, paired sd 0.028, ahead in 1 of 4 seeds; not met)" in goal
    assert "survival" not in goal  # no seed had it
    # the spatial goal pair alone (a run without plain mean pooling) still reports it
    alone = pooling_goal({"umeml +spatial": spatial, "umeml +spatial -cross-attention": mean, "umeml": mean})
    assert alone.startswith("Goal `umeml +spatial` - `umeml +spatial -cross-attention`")
    assert pooling_goal({"umeml": mean}) == ""


def test_a_subsection_keeps_the_sections_date_and_carries_its_own(tmp_path):
    from bench.bench_synthetic import TITLE_CLUSTERED, write_clustered

    path = tmp_path / "b.md"
    write_section(path, TITLE_CLUSTERED, "main figures", when="2026-12-02, x86_64, 2 cores, CPU")
    write_clustered(path, "budget figures", 32, None, None, today="2026-12-03, x86_64, 2 cores, CPU")
    text = path.read_text()
    assert f"{TITLE_CLUSTERED} (2026-12-02, x86_64, 2 cores, CPU)" in text  # the main text's date, kept
    assert "main figures" in text
    assert "### Training budget --epochs 32\n\nRun 2026-12-03, x86_64, 2 cores, CPU. budget figures" in text
    write_clustered(path, "new main figures", None, None, None, today="2026-12-04, x86_64, 2 cores, CPU")
    text = path.read_text()
    assert "(2026-12-02" not in text and "new main figures" in text and "Run 2026-12-04" not in text

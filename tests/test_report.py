"""`umeml report`: the page and plots of centralized, federated (deployment-like, with DP) and
comparison runs, the figures' own numbers, the slide heatmap and the CLI's errors."""

import base64
import html as html_lib
import json
import re

import h5py
import numpy as np
import pytest

from umeml.cli import main as umeml_main
from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.cohort import load_data_dir
from umeml.data.source import CohortSource
from umeml.metrics.classification import binary_auc, roc_curve
from umeml.report import Options, ReportError, figures, load_predictions, write_report
from umeml.report.figures import kaplan_meier, risk_groups
from umeml.server.coordinator import Coordinator
from umeml.train.central import train_central

from fed_helpers import LocalGrid, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPERIMENT = {"name": "report-test", "epochs": 2, "bootstrap": 20, "split": {"test_sites": ["A2"]}}  # tiny_experiment


@pytest.fixture(scope="module")
def central_run(tiny_cohort_dir, tmp_path_factory):
    cfg = tiny_experiment(**EXPERIMENT)
    out = tmp_path_factory.mktemp("central") / "run"
    train_central(cfg, load_data_dir(tiny_cohort_dir, cfg.data), out, progress=False)
    return out


@pytest.fixture(scope="module")
def federated_dp_run(tiny_cohort_dir, tmp_path_factory):
    """A federation run as a deployment leaves it (no pooled predictions), sites under DP at epsilon 8."""
    cfg = tiny_experiment(**EXPERIMENT, local_dp={"enabled": True, "target_epsilon": 8.0, "delta": 1e-5,
                                                  "max_grad_norm": 1.0})
    out = tmp_path_factory.mktemp("fed") / "run"
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(tiny_cohort_dir)),
                                          state_root=str(out / "sites")))
    Coordinator(cfg, out, expected_sites=3, held_out=("A2",), wait_timeout=5, printer=lambda s: None).run(LocalGrid(app, 3))
    from umeml.config import dump_config

    (out / "config.yaml").write_text(dump_config(cfg))
    return out


@pytest.fixture(scope="module")
def central_page(central_run) -> str:
    """The centralized run's report page, written once for the tests that only read it."""
    return write_report(central_run).read_text()


@pytest.fixture(scope="module")
def federated_page(federated_dp_run) -> str:
    """The federated run's report page, written once for the tests that only read it."""
    return write_report(federated_dp_run).read_text()


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def _assert_self_contained(page: str) -> None:
    # nothing is fetched: no external script, stylesheet or image; links only to anchors and sibling reports
    assert not re.search(r"<script|<link|src=['\"](?!data:)", page)
    for href in re.findall(r"href='([^']+)'", page):
        assert href.startswith("#") or href.endswith("/report.html"), href
    for png in _images(page):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000


def test_centralized_report_has_every_plot(central_run, central_page):
    page = central_page
    plots = {p.name for p in (central_run / "plots").glob("*.png")}
    assert plots >= {"curves.png", "roc_grade.png", "roc_subtype.png", "confusion_grade.png", "confusion_subtype.png",
                     "kaplan_meier.png", "forest_grade.png", "forest_subtype.png", "forest_survival.png"}
    assert len(_images(page)) == len(plots)
    _assert_self_contained(page)
    final = json.loads((central_run / "final.json").read_text())
    # the page states the run's own numbers and the log-rank test
    assert f"{final['test']['grade']['auc_macro']['value']:.3f}" in page
    assert "Log-rank test p =" in page and "torch" in page and "report-test" in page


def test_saved_predictions_reproduce_the_test_metrics(central_run):
    preds = load_predictions(central_run / "predictions.npz")
    final = json.loads((central_run / "final.json").read_text())
    assert len(preds) == final["n_test"] and set(preds.sites.tolist()) == {"A2"}
    auc = np.mean([binary_auc(preds.labels["grade"] == k, preds.probs["grade"][:, k])
                   for k in range(preds.probs["grade"].shape[1]) if 0 < (preds.labels["grade"] == k).sum() < len(preds)])
    assert auc == pytest.approx(final["test"]["grade"]["auc_macro"]["value"], abs=1e-6)
    assert preds.classes["grade"] == ["II", "III", "IV"]


def test_federated_report_states_the_privacy_budget(federated_dp_run, federated_page):
    page = federated_page
    ledger = json.loads((federated_dp_run / "privacy.json").read_text())
    for site, entry in ledger["final"]["local"].items():
        assert entry["epsilon"] <= entry["epsilon_total"] <= 8.0  # the budget bounds DP-SGD with the releases
        assert f"site {site}: total epsilon {entry['epsilon_total']:.3f} &lt;= its budget 8" in page
        total = ledger["final"]["total"][site]
        assert [r["kind"] for r in total["releases"]] == ["dp_sgd", "survival_histogram", "class_counts",
                                                          "genomic_moments"]
        assert f"<td>{site}</td><td>{total['epsilon']:.3f}</td>" in page
        assert f"<td>{entry['epsilon']:.3f}</td><td>{entry['epsilon_total']:.3f}</td>" in page  # the entries' table
    plots = {p.name for p in (federated_dp_run / "plots").glob("*.png")}
    # deployment-like: no per-patient predictions, so no ROC / KM; confusion summed from the sites' counts
    assert {"curves.png", "privacy_epsilon.png", "confusion_grade.png", "forest_grade.png"} <= plots
    assert not any(p.startswith(("roc_", "kaplan")) for p in plots)
    assert "never leave a site" in page
    _assert_self_contained(page)


def test_roc_curve_area_matches_auc_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    score = np.round(rng.random(200) + y * 0.4, 1)  # rounding makes many ties
    fpr, tpr = roc_curve(y, score)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_auc(y, score), abs=1e-12)
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_curve(np.ones(3, bool), np.arange(3.0))


def test_risk_groups_and_log_rank():
    from lifelines.statistics import logrank_test

    rng = np.random.default_rng(1)
    risk = rng.normal(size=120)
    months = rng.exponential(40 * np.exp(-risk))  # higher risk, shorter survival
    censored = (rng.random(120) < 0.3).astype(int)
    groups, names = risk_groups(risk, "median")
    assert len(names) == 2 and np.bincount(groups).tolist() == [60, 60]
    assert risk[groups == 1].min() > risk[groups == 0].max()
    groups3, _ = risk_groups(risk, "tertiles")
    assert np.bincount(groups3).tolist() == [40, 40, 40]
    _, summary = kaplan_meier(months, censored, risk, "median")
    direct = logrank_test(months[groups == 0], months[groups == 1], 1 - censored[groups == 0], 1 - censored[groups == 1])
    assert summary["p_value"] == pytest.approx(direct.p_value) and summary["p_value"] < 1e-3
    with pytest.raises(ValueError, match="unknown scheme"):
        risk_groups(risk, "quartiles")


def test_comparison_and_collection_reports(central_run, tmp_path):
    final = json.loads((central_run / "final.json").read_text())
    cmp_dir = tmp_path / "cmp"
    cmp_dir.mkdir()
    results = {m: {"test": final["test"], "n": final["n_test"]} for m in ("centralized", "federated", "local-only A0")}
    (cmp_dir / "comparison.json").write_text(json.dumps({"held_out_sites": ["A2"], "training_sites": ["A0", "A1"],
                                                         "results": results}))
    page = write_report(cmp_dir).read_text()
    assert (cmp_dir / "plots" / "comparison.png").is_file() and "local-only A0" in page
    # a folder of runs (leave-one-site-out) gets a summary with links to each run's report
    loso = tmp_path / "loso"
    (loso / "holdout-A2").mkdir(parents=True)
    for name in ("final.json", "config.yaml", "metrics.csv"):
        (loso / "holdout-A2" / name).write_bytes((central_run / name).read_bytes())
    write_report(loso / "holdout-A2")
    page = write_report(loso).read_text()
    assert "href='holdout-A2/report.html'" in page and (loso / "plots" / "forest_grade.png").is_file()


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ReportError, match="no final.json"):
        write_report(tmp_path)
    (tmp_path / "final.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"final\.json: cannot read it as JSON"):
        write_report(tmp_path)
    assert umeml_main(["report", str(tmp_path / "absent")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert umeml_main(["report", str(tmp_path), "--features", "x.h5"]) == 2
    assert "only make sense with --slide" in capsys.readouterr().err


def test_prototype_heatmap_over_a_slide(central_run, tmp_path, capsys):
    pytest.importorskip("openslide")
    from bench._slides import make_slide_image, write_aperio_svs
    from umeml.model import load

    img = make_slide_image(2048, 1536, [(256, 256, 1024, 768), (1536, 512, 256, 512)], seed=3)
    slide = write_aperio_svs(tmp_path / "case.svs", img)
    model, _ = load(central_run / "checkpoints" / "best.pt")
    dim = model.path.proj[0].in_features
    coords = np.array([(x, y) for y in range(256, 1024, 128) for x in range(256, 1280, 128)], np.int64)
    bag = tmp_path / "case.h5"
    with h5py.File(bag, "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(len(coords), dim)).astype(np.float16)
        f["coords"] = coords
        f.attrs["patch_size_level0"] = 128
    assert umeml_main(["report", str(central_run), "--slide", str(slide), "--features", str(bag)]) == 0
    assert (central_run / "plots" / "prototype_heatmap.png").is_file()
    assert "Prototype attention on a slide" in (central_run / "report.html").read_text()
    # a bag of the wrong feature dimension is refused with both numbers
    with h5py.File(bag, "w") as f:
        f["features"] = np.zeros((4, dim + 1), np.float32)
        f["coords"] = coords[:4]
    assert umeml_main(["report", str(central_run), "--slide", str(slide), "--features", str(bag)]) == 2
    assert f"{dim + 1}-dim features, the checkpoint expects {dim}" in capsys.readouterr().err


def test_heatmap_needs_its_inputs(central_run, tmp_path, monkeypatch):
    # said before any plot is drawn (it used to draw the whole report first)
    from umeml.report import build

    monkeypatch.setattr(build, "_run_sections", lambda *a: pytest.fail("plots drawn before the inputs were checked"))
    with pytest.raises(ReportError, match="--slide needs --features"):
        write_report(central_run, Options(slide=tmp_path / "s.svs"))
    with pytest.raises(ReportError, match="no such file"):
        write_report(central_run, Options(slide=tmp_path / "s.svs", features=tmp_path / "f.h5"))
    # and so is a bag the checkpoint cannot read (the slide itself is not opened for that)
    pytest.importorskip("openslide")
    (tmp_path / "s.svs").write_bytes(b"not read")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = np.zeros((4, 3), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
        f.attrs["patch_size_level0"] = 128
    with pytest.raises(ReportError, match="3-dim features, the checkpoint expects"):
        write_report(central_run, Options(slide=tmp_path / "s.svs", features=tmp_path / "f.h5"))


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _title_boxes(page: str) -> list[tuple[list, bytes]]:
    """(title extents recorded at save time, the PNG) of every image of the page."""
    found = re.findall(r"data-title-px='([^']*)' src='data:image/png;base64,([^']+)'", page)
    return [(json.loads(html_lib.unescape(px)), base64.b64decode(data)) for px, data in found]


def _max_paren_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("page_of", ["central_page", "federated_page"], ids=["central_run", "federated_dp_run"])
def test_no_title_is_wider_than_its_image_and_no_caption_nests_parentheses(page_of, request):
    page = request.getfixturevalue(page_of)
    boxes = _title_boxes(page)
    assert boxes and len(boxes) == len(_images(page))
    for titles, png in boxes:
        width, height = _png_size(png)
        for x0, x1, y0, y1 in titles:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (titles, width, height)
    assert sum(bool(t) for t, _ in boxes) >= len(boxes) - 1  # every figure but at most one has titles
    texts = re.findall(r"<p>(.*?)</p>|<figcaption>(.*?)</figcaption>", page, flags=re.S)
    for text in (a or b for a, b in texts):
        assert _max_paren_depth(re.sub(r"<[^>]+>", "", text)) <= 1, text


def test_forest_caption_mentions_k_only_where_sites_report(central_page, federated_page):
    assert "privacy threshold k" not in central_page
    assert "privacy threshold k" in federated_page


def test_each_release_is_listed_once_with_its_explanation(federated_dp_run, federated_page):
    page = federated_page
    ledger = json.loads((federated_dp_run / "privacy.json").read_text())
    kinds = [r["kind"] for r in ledger["releases"]]
    sites = sorted({r["site"] for r in ledger["releases"] if r.get("site")})
    assert kinds == ["survival_histogram"] + ["class_counts", "genomic_moments"] * len(sites) and sites
    releases = page.split("One-off releases:</p><ul>", 1)[1].split("</ul>", 1)[0]
    assert releases.count("<li>") == len(kinds) and releases.count("survival_histogram") == 1
    assert "histogram of uncensored survival times" in releases  # the ledger's note on that release
    assert f"class_counts (site {sites[0]})" in releases and f"genomic_moments (site {sites[-1]})" in releases
    for note in ("released once (federation.stats_privacy)", "absent when federation.stats_privacy is off"):
        assert releases.count(note) == 1  # each kind's note once, with its first release
    about = page.split("About the ledger:</p><ul>", 1)[1].split("</ul>", 1)[0]
    assert "survival_histogram" not in about and "class_counts" not in about and "local: per-patient DP-SGD" in about


def test_the_preprocessing_notes_are_shown_next_to_the_releases(federated_dp_run, federated_page):
    # privacy.json kept them, but the page did not show how the noisy statistics were used
    notes = json.loads((federated_dp_run / "privacy.json").read_text())["preprocessing_notes"]
    assert notes, "the tiny DP federation's merge should have noted its noise floors / shrinkage"
    shown = federated_page.split("combined the training sites' statistics (costs no privacy):</p><ul>", 1)[1]
    shown = shown.split("</ul>", 1)[0]
    assert shown.count("<li>") == len(notes) and all(html_lib.escape(n) in shown for n in notes)
    # a release whose sites used different epsilons ("auto" follows each site's own total) lists them
    from umeml.report.build import _release_epsilon

    assert _release_epsilon({"epsilon": 1.0, "epsilon_by_site": {"A0": 1.0, "A1": 1.0}}) == "1"
    assert _release_epsilon({"epsilon": 1.0, "epsilon_by_site": {"A1": 0.4, "A0": 1.0}}) == "1 (the largest; A0: 1, A1: 0.4)"


def test_figure_titles_fit_their_figures():
    rng = np.random.default_rng(0)
    six = ["ASTR", "OAST", "ODG", "AASTR", "AOAST", "GBM"]
    figs = [figures.confusion_matrix("grade", rng.integers(0, 20, (3, 3)), ["II", "III", "IV"], "held-out patients pooled"),
            figures.confusion_matrix("subtype", rng.integers(0, 20, (6, 6)), six, "held-out sites summed"),
            figures.roc_curves("subtype", rng.dirichlet(np.ones(6), 60), rng.integers(0, 6, 60), six),
            figures.kaplan_meier(rng.uniform(1, 60, 40), np.ones(40, int), rng.normal(size=40), "tertiles")[0],
            figures.forest_plot([{"label": "combined, CI resampling sites", "value": 0.7, "low": 0.6, "high": 0.8,
                                  "n": 197, "kind": "summary"}], figures.metric_label("subtype", "auc_macro"))]
    for fig in figs:
        assert figures.clipped_titles(fig) == [], [t["text"] for t in figures.title_extents(fig)]
    # the check itself can fail: a title longer than its figure is reported
    wide = figures.confusion_matrix("grade", np.eye(3), ["II", "III", "IV"], "x" * 120)
    assert figures.clipped_titles(wide) and figures.title_extents(wide)[0]["x1"] > wide.bbox.width


def test_a_report_figure_is_saved_as_savefig_saves_it(tmp_path):
    # the report draws each figure once for its title extents and its PNG: the file must be the one
    # savefig writes (same pixels, same size), and the extents those of that drawing
    from matplotlib.image import imread

    def forest():
        return figures.forest_plot([{"label": "combined", "value": 0.7, "low": 0.6, "high": 0.8, "n": 97,
                                     "kind": "summary"}], figures.metric_label("grade", "auc_macro"))

    reference = forest()
    reference.savefig(tmp_path / "savefig.png")
    extents = figures.save_png(forest(), tmp_path / "once.png")
    assert np.array_equal(imread(tmp_path / "savefig.png"), imread(tmp_path / "once.png"))
    assert extents == figures.title_extents(reference) and extents

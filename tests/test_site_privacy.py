"""What leaves a site, beyond the message audit: the DP survival histogram and its bin edges,
the binding of a site id to its registered key, and redacted error replies."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from umeml.client.app import SimulatedSites, SiteError, build_client_app
from umeml.data.cohort import load_data_dir
from umeml.data.labels import edges_from_histogram
from umeml.data.source import CohortSource
from umeml.federation.privacy import SiteLedger, discrete_laplace
from umeml.federation.protocol import survival_grid
from umeml.federation.redact import redact
from umeml.federation.site import SiteRuntime
from umeml.federation.stats_release import release_epsilons
from umeml.server.coordinator import Coordinator

from fed_helpers import LocalGrid, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SITES = ("A0", "A1", "A2")




def experiment(**fed):
    return tiny_experiment(**{"rounds": 1, **fed})


@pytest.fixture(scope="module")
def app(tiny_cohort_dir):
    return build_client_app(SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir))))


def coordinator(tmp_path, cfg=None, out="run"):
    return Coordinator(cfg or experiment(), tmp_path / out, expected_sites=len(SITES), held_out=("A2",),
                       wait_timeout=5, printer=lambda s: None)


# --------------------------------------------------------------------------- noise and bin edges
def test_noise_is_discrete_laplace_of_scale_one_over_epsilon():
    x = discrete_laplace(200_000, 1.0, np.random.default_rng(0))
    a = np.exp(-1.0)
    assert x.dtype == np.int64 and abs(x.mean()) < 0.02
    assert np.mean(x == 0) == pytest.approx((1 - a) / (1 + a), abs=0.005)  # P(0) of the two-sided geometric
    assert x.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.03)
    assert np.mean(x == 3) == pytest.approx(np.mean(x == 0) * a ** 3, rel=0.1)  # P(k) ~ exp(-eps |k|)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        discrete_laplace(3, 0.0)


def test_noise_is_not_a_function_of_the_experiment_seed(tiny_cohort_dir):
    cfg = experiment()
    assert cfg.seed == 0 and release_epsilons(cfg.federation, None).survival_hist == 1.0  # "auto", no DP
    cohort = load_data_dir(tiny_cohort_dir, cfg.data)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5)
    first, second = site.preprocess(cfg)["survival_hist"], site.preprocess(cfg)["survival_hist"]
    assert len(first) == len(survival_grid()) - 1
    assert first != second  # same seed, same data, fresh noise (all 46 cells equal: probability < 1e-20)
    assert not np.array_equal(discrete_laplace(50, 1.0), discrete_laplace(50, 1.0))


def test_simulated_sites_seed_their_noise_real_sites_do_not(tiny_cohort_dir):
    """A simulation is reproducible (noise seeded by experiment seed and site, distinct per site);
    a site built without a seed (every deployed site) keeps drawing from OS entropy."""
    from types import SimpleNamespace

    cfg = experiment()
    sites = SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir)))

    def runtime(partition, sim=sites, c=cfg):
        return sim(SimpleNamespace(node_config={"partition-id": partition}), c)

    a0, again, a1 = runtime(0), runtime(0), runtime(1)
    assert a0.dp_seed == again.dp_seed != a1.dp_seed
    assert a0.preprocess(cfg)["survival_hist"] == again.preprocess(cfg)["survival_hist"]
    other_seed = runtime(0, c=dataclasses.replace(cfg, seed=1))
    assert other_seed.dp_seed != a0.dp_seed
    unseeded = runtime(0, sim=dataclasses.replace(sites, seeded_noise=False))
    assert unseeded.dp_seed is None
    assert unseeded.preprocess(cfg)["survival_hist"] != unseeded.preprocess(cfg)["survival_hist"]


def test_exact_histogram_only_when_asked_and_warned(tiny_cohort_dir, caplog):
    cfg = experiment(survival_hist_epsilon=None)
    cohort = load_data_dir(tiny_cohort_dir, cfg.data)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5)
    train, _ = site._split(cfg)
    times, events = cohort.times_events(train)
    exact, _ = np.histogram(times[events == 1], bins=survival_grid())
    with caplog.at_level(logging.WARNING, logger="umeml.site"):
        assert site.preprocess(cfg)["survival_hist"] == exact.tolist()
    assert "EXACT survival histogram" in caplog.text


def test_site_ledger_records_the_release_once(tiny_cohort_dir, tmp_path):
    cfg = experiment()
    cohort = load_data_dir(tiny_cohort_dir, cfg.data)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5, state_dir=str(tmp_path / "state"))
    first = site.preprocess(cfg)["survival_hist"]
    # asked again for the same patients (a restarted run, another experiment name): the same noisy
    # answer, since fresh noise each time would let the coordinator average it away
    assert site.preprocess(cfg)["survival_hist"] == first
    assert site.preprocess(dataclasses.replace(cfg, name="other"))["survival_hist"] == first
    ledger = SiteLedger(tmp_path / "state", "A0")
    (rel,) = ledger.releases()
    assert rel["kind"] == "survival_histogram" and rel["epsilon"] == 1.0 and rel["delta"] == 0.0
    assert rel["noisy_counts"] == first and rel["experiment"] == cfg.name and ledger.entries() == []
    # another epsilon is another release; the ledger sums the histograms' epsilons
    site.preprocess(experiment(survival_hist_epsilon=0.5))
    assert [r["histogram_epsilon_total"] for r in ledger.releases()] == [1.0, 1.5]


@pytest.mark.parametrize("n_bins", [2, 4, 8])
def test_edges_strictly_increasing_for_a_tiny_noisy_federation(n_bins):
    grid = survival_grid()
    rng = np.random.default_rng(n_bins)
    fallbacks = set()
    for trial in range(300):
        exact = np.zeros(len(grid) - 1, int)
        exact[rng.integers(0, 15, size=rng.integers(0, 6))] += 1  # 0-5 deaths in the first 45 months
        noisy = sum(exact * (s == 0) + discrete_laplace(exact.shape, 1.0, rng) for s in range(2))
        notes = []
        edges = edges_from_histogram(grid, noisy, n_bins, notes)
        assert len(edges) == n_bins - 1 and np.all(np.diff(edges) > 0), (trial, noisy.tolist(), edges)
        assert set(edges.tolist()) <= set(grid[1:-1].tolist())
        fallbacks.update(n.split(":")[0] for n in notes)
    assert any("< n_bins" in f for f in fallbacks)  # the positive-part rule was exercised
    # nothing positive at all: evenly spaced cells, never "empty survival histogram"
    notes = []
    edges = edges_from_histogram(grid, -np.ones(len(grid) - 1), n_bins, notes)
    assert np.all(np.diff(edges) > 0) and "no positive cell" in notes[0]


def test_noisy_edges_close_to_exact_quantiles_with_many_patients():
    """3 sites x 500 uncensored patients, epsilon 1: every noisy edge is at most one grid cell
    (3 months here) from the edge of the exact summed histogram. Measured over 3000 noise draws:
    74 % identical, the rest one cell off, never more."""
    grid = survival_grid()
    data = np.random.default_rng(1)
    times = [data.weibull(1.2, 500) * 30 for _ in range(3)]  # median about 22 months
    hists = [np.histogram(t, bins=grid)[0] for t in times]
    exact = edges_from_histogram(grid, np.sum(hists, axis=0), 4)
    true = np.quantile(np.concatenate(times), [0.25, 0.5, 0.75])
    assert np.all(np.abs(exact - true) <= 3.0)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        noisy = np.sum([h + discrete_laplace(h.shape, 1.0, rng) for h in hists], axis=0)
        assert noisy.min() < 0  # the cells are not clipped at 0
        edges = edges_from_histogram(grid, noisy, 4)
        cells_off = np.abs(np.searchsorted(grid, edges) - np.searchsorted(grid, exact))
        assert cells_off.max() <= 1, (seed, edges, exact)


def test_run_records_the_histogram_release(app, tmp_path):
    final = coordinator(tmp_path).run(LocalGrid(app, len(SITES)))
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    (rel,) = ledger["releases"]
    assert rel["kind"] == "survival_histogram" and rel["epsilon"] == 1.0 and rel["sites"] == ["A0", "A1"]
    assert final["privacy"]["survival_histogram_epsilon"] == 1.0
    edges = json.loads((tmp_path / "run" / "preprocessing.json").read_text())["survival_edges"]
    assert edges == rel["survival_edges"] and np.all(np.diff(edges) > 0)


# --------------------------------------------------------------------------- site identity
def test_handshake_refused_when_site_id_differs_from_registered_key_name(app, tmp_path):
    # node 102 authenticated with the key registered as A2 but plays (claims) A1: it is refused
    # and the run goes on with the others (it used to fail the whole federation)
    grid = LocalGrid(app, len(SITES), names={101: "A0", 102: "A2"})
    final = coordinator(tmp_path).run(grid)
    assert final["training_sites"] == ["A0"] and final["rounds"] >= 1
    # the refused node is told why (its site records it for `umeml-client start`) and gets nothing else
    assert {m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == 102} == {"query.handshake",
                                                                                             "query.refused"}
    (notice,) = [r for r in grid.received if r.metadata.src_node_id == 102 and r.metadata.message_type == "query.refused"]
    assert not notice.has_error()
    log = (tmp_path / "run" / "coordinator.log").read_text()
    assert ("handshake refused for site A1: node 102 authenticated with the key registered as 'A2' but its "
            "handshake claims site id 'A1'") in log
    assert "site A1 (node 102) refused" in (tmp_path / "run" / "progress.log").read_text()
    # matching names pass
    final = coordinator(tmp_path, out="ok").run(LocalGrid(app, len(SITES), names={101: "A0", 102: "A1", 103: "A2"}))
    assert final["training_sites"] == ["A0", "A1"]


def test_second_node_claiming_a_connected_sites_id_is_refused(app, tmp_path):
    joined = []

    def join_after_round_1(reply):  # while A0's node 101 answers round 1, a new node claiming A0 connects
        if reply.metadata.message_type == "train" and not joined:
            joined.append(grid.add_node(partition=0))
        return reply

    grid = LocalGrid(app, len(SITES), tamper={101: join_after_round_1})
    final = coordinator(tmp_path, experiment(rounds=2)).run(grid)
    assert final["rounds"] == 2 and joined == [104]
    trained = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"]
    assert 104 not in trained and trained.count(101) == 2
    log = (tmp_path / "run" / "coordinator.log").read_text()
    assert "node 104 claims site id 'A0', which node 101 (still connected) holds" in log


def test_rejoining_site_takes_over_once_the_old_node_is_gone(app, tmp_path):
    grid = LocalGrid(app, len(SITES))

    def restart(reply):  # A0's SuperNode restarts after round 1 and comes back as a new node
        if reply.metadata.message_type == "train" and 101 in grid.node_ids:
            grid.node_ids.remove(101)
            grid.add_node(partition=0)
        return reply

    grid.tamper = {101: restart}
    final = coordinator(tmp_path, experiment(rounds=2)).run(grid)
    trained = [(m.content["config"]["server-round"], m.metadata.dst_node_id) for m in grid.sent
               if m.metadata.message_type == "train"]
    assert final["rounds"] == 2 and (2, 104) in trained and (2, 101) not in trained


# --------------------------------------------------------------------------- redacted errors
def test_redact_paths_and_ids():
    text = ("[Errno 2] No such file or directory: '/data/hospA/bags/TCGA-02-0001-01Z-00-DX1.h5'; "
            "also C:\\sites\\x.yaml, ~/keys/site, file:///srv/a.csv, bags/P-0007-S1.h5 and P-0007 (3/4 done)")
    out = redact(text, ["P-0007", "P-0007-S1", "x"])
    for leak in ("/data", "hospA", "TCGA-02", "sites", "keys", "/srv", "P-0007"):
        assert leak not in out, (leak, out)
    assert out.count("<path>") == 4 and "bags/<id>.h5 and <id> (3/4 done)" in out
    assert redact("expected 3/4 of https://example.org/docs") == "expected 3/4 of https://example.org/docs"


def test_error_reply_is_redacted_and_full_text_stays_in_the_site_log(tiny_cohort_dir, caplog):
    cohort_path = str(tiny_cohort_dir)
    cohort = load_data_dir(tiny_cohort_dir, experiment().data)
    slide = cohort.patients[0].slide_ids[0]
    bag = f"{cohort_path}/bags/{slide}.h5"

    def broken(context, cfg):
        raise FileNotFoundError(f"bag of slide {slide} missing: {bag}")

    grid = LocalGrid(build_client_app(broken), 1)
    msg = Message(RecordDict({"config": ConfigRecord({"experiment": json.dumps({"seed": 0})})}), dst_node_id=101,
                  message_type="query.handshake")
    with caplog.at_level(logging.ERROR, logger="umeml.site"), pytest.raises(SiteError) as err:
        grid.send_and_receive([msg])
    sent = str(err.value)  # what Flower puts into the error reply's reason
    assert sent.startswith("FileNotFoundError: bag of slide ") and "<path>" in sent
    assert cohort_path not in sent and slide not in sent and "TCGA" not in sent
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the original is not chained
    assert bag in caplog.text and "redacted" in caplog.text  # the site's own log keeps everything

"""Federation benchmarks: deployment overhead per round on loopback (Flower's process per message
vs the resident site runtime, interleaved), the 20-round demo deployment's wall time, bytes per
round per site at paper size, and a 35-site GBM-LGG simulation (wall time, peak memory).

    python -m bench.bench_federation [--rounds 3] [--repeats 2] [--demo-rounds 20] [--skip-deploy]
                                     [--skip-demo] [--skip-sim] [--write docs/benchmarks.md]

Overhead per round = round wall time minus the slowest site's local compute in the round's
waves (validation plus training at a training site, evaluation at a held-out site), measured
inside the coordinator: process start-up, imports, cohort loading, polling, transfer,
aggregation and checkpointing all count as overhead. Every process runs with one torch thread
(``OMP_NUM_THREADS=1``) and ``nice``; the load average is printed with every figure.
Bytes per round per site at paper size come from the serialized size of the messages (Flower's
object tree, what the SuperNode pushes and pulls), relative to the model's float32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench._harness import REPO, TCGA, TreeMemory, command, descendants, loadavg, write_section

MODULE = "bench.bench_federation"
SIM_ROW = "| simulation,"  # the 35-site simulation's row starts so
TITLE = "## Federation"
BIN = Path(sys.executable).parent
STOCK_PULLS = {"UMEML_PULL_BACKOFF": "flower"}  # every process keeps Flower's 1 s, 2 s, 4 s ... pull backoff
# (label, umeml-client start flags, environment of every process of the deployment): Flower's own
# behaviour, the resident runtime alone, and this project's default
VARIANTS = (
    ("per-message process, Flower's polling (3 s idle, 0.5 s reply) and pull backoff (1 s doubling)",
     ["--runtime", "per-message", "--idle-poll", "3", "--busy-poll", "3", "--reply-poll", "0.5"], STOCK_PULLS),
    ("resident runtime, tuned polling (1 s idle, 0.25 s in a run, 0.05 s reply), Flower's pull backoff",
     ["--runtime", "resident"],
     STOCK_PULLS),
    ("resident runtime, tuned polling, short pull backoff (10 ms doubling to 0.1 s): the default",
     ["--runtime", "resident"], {}),
)
# at idle no object is pulled: the pull backoff plays no part
IDLE_VARIANTS = (("per-message process, Flower's polling (3 s idle, 0.5 s reply)", VARIANTS[0][1]),
                 ("resident runtime, tuned polling (1 s idle, 0.25 s in a run, 0.05 s reply)", VARIANTS[2][1]))


NOTES = """\
Overhead per round = round wall time minus the slowest site's local compute in the round's waves
(validation plus training at a training site, evaluation at a held-out site: the model's forward
and backward passes, metrics included, as each site times them), measured by the coordinator;
the last round also holds the final evaluation wave. Everything else is overhead: Flower's
processes and polling, moving the messages, the ServerApp's screening and aggregation, and the
coordinator's checkpoint and metrics writes after a round (counted in the next round's wall
time; the last round's only in the 20-round wall time). The demo config holds out one of the three sites
(`split.n_test_sites: 1`, chosen by seed). All variants use one wave per round and send the
weights packed (one array per dtype: 8 Flower objects per message instead of ~170). They differ
in the ClientApp process (Flower's `flwr-clientapp` per message, which imports flwr, torch and
umeml and reads the cohort each time, vs the resident process), in the SuperNode's polling and in
the object-pull backoff: Flower waits 1 s, 2 s, 4 s, 8 s for an object whose upload has not
finished, which every hop of a round meets (`UMEML_PULL_BACKOFF=flower` keeps it), umeml 10 ms
doubling to 0.1 s. Every process runs with one torch thread and `nice`. Idle CPU: a SuperLink and
one connected site without a run, CPU seconds of the site's process tree (and of the SuperLink)
over the idle period. Bytes: the serialized size of one round's messages (Flower's object tree,
what the SuperNode pulls and pushes) for the paper-size model in float32, packed as sent,
relative to 4 bytes per parameter; a training site receives one train message and sends one
reply per round, a held-out site receives one evaluate message.
"""


def _prepare(work: Path, rounds: int) -> list[str]:
    """The demo cohort's three sites (60 patients each) and the demo config with ``rounds``."""
    from umeml.data.synth import SynthSpec, generate, split_by_site

    if not (work / "sites").is_dir():
        generate(SynthSpec(sites=3, patients=60, seed=0), work / "all", overwrite=True)
        split_by_site(work / "all", work / "sites")
    ids = sorted(p.name for p in (work / "sites").iterdir())
    for s in ids:
        (work / f"{s}.yaml").write_text(
            f"site_id: {s}\ndata_dir: sites/{s}\ndevice: cpu\nstate_dir: state/{s}\n")
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["federation"]["rounds"] = rounds
    (work / "exp.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ids


def deployment(work: Path, rounds: int, site_flags: list[str], out: str, extra_env: dict | None = None) -> dict:
    """``umeml-server start`` and three ``umeml-client start`` on 127.0.0.1 (``extra_env`` in
    every process's environment); returns the coordinator's per-round timings, the wall time and
    the SuperLink's traffic accounting."""
    from umeml.flower.processes import free_port, stop_process

    ids = _prepare(work, rounds)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra_env or {})}
    port, procs, load_before = free_port(), [], loadavg()
    t0 = time.monotonic()
    try:
        server = subprocess.Popen(["nice", "-n", "5", str(BIN / "umeml-server"), "start", "--config", "exp.yaml",
                                   "--sites", "3", "--out", out, "--port", str(port)], cwd=work, env=env,
                                  start_new_session=True, stdout=(work / f"{out}.server.log").open("wb"),
                                  stderr=subprocess.STDOUT)
        procs.append(server)
        for s in ids:
            procs.append(subprocess.Popen(
                ["nice", "-n", "5", str(BIN / "umeml-client"), "start", "--site", f"{s}.yaml", "--config", "exp.yaml",
                 "--server", f"127.0.0.1:{port}", "--port", str(free_port()), *site_flags], cwd=work, env=env,
                start_new_session=True, stdout=(work / f"{out}.{s}.log").open("wb"), stderr=subprocess.STDOUT))
        if server.wait(timeout=3600) != 0:
            raise RuntimeError((work / f"{out}.server.log").read_text()[-3000:])
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            stop_process(p, grace=15)
    final = json.loads((work / out / "final.json").read_text())
    traffic = json.loads((work / out / "flower-run.json").read_text())["runs"][-1]["network-traffic"]
    return {"rounds": final["rounds"], "wall_s": wall, "seconds": final["seconds_per_round"],
            "overhead": final["overhead_seconds_per_round"], "outbound": traffic["outbound-bytes"],
            "inbound": traffic["inbound-bytes"], "load": f"{load_before} -> {loadavg()}"}


def overhead_rows(tmp: Path, rounds: int, repeats: int) -> tuple[list[str], list[dict]]:
    """The variants, interleaved ``repeats`` times: overhead per round (median, best); also the
    default variant's runs."""
    results: dict[str, list[dict]] = {label: [] for label, _, _ in VARIANTS}
    for rep in range(repeats):
        for i, (label, flags, env) in enumerate(VARIANTS):
            r = deployment(tmp / "overhead", rounds, flags, f"run-{rep}-{i}", env)
            results[label].append(r)
            print(f"{label} #{rep + 1}: overhead {r['overhead']} s/round, load {r['load']}", flush=True)
    rows = []
    for label, runs in results.items():
        over = [x for r in runs for x in r["overhead"]]
        secs = [x for r in runs for x in r["seconds"]]
        compute = [t - o for t, o in zip(secs, over)]
        rows.append(f"| loopback, 3 sites, demo config: {label} | {rounds} x {repeats} | "
                    f"overhead median {statistics.median(over):.1f} s, best {min(over):.1f} s "
                    f"(round median {statistics.median(secs):.1f} s, slowest site's compute median "
                    f"{statistics.median(compute):.1f} s; per round {', '.join(f'{x:.1f}' for x in over)}) | "
                    f"load {'; '.join(r['load'] for r in runs)} |")
    return rows, results[VARIANTS[-1][0]]


def goals_text(default_runs: list[dict], demo: dict | None, demo_rounds: int) -> str:
    """Issue 14's two deployment goals against this run's figures (with the load they ran at)."""
    parts = []
    if default_runs:
        over = [x for r in default_runs for x in r["overhead"]]
        verdict = "met" if statistics.median(over) <= 2.0 else "NOT met"
        parts.append(f"overhead <= 2 s per round (quiet machine): {verdict} at this load, median "
                     f"{statistics.median(over):.1f} s, best {min(over):.1f} s (loads "
                     f"{'; '.join(r['load'] for r in default_runs)})")
    if demo is not None:
        verdict = "met" if demo["wall_s"] < 180 else "NOT met"
        parts.append(f"{demo_rounds}-round demo deployment under 3 minutes: {verdict}, {demo['wall_s']:.0f} s "
                     f"(load {demo['load']})")
    return ("Goals (issue 14), default settings: " + "; ".join(parts) + ".\n") if parts else ""


def demo_row(tmp: Path, rounds: int) -> tuple[str, dict | None]:
    """The demo config's deployment with ``rounds`` rounds, resident runtime: wall time (a row
    saying why when the run failed)."""
    try:
        r = deployment(tmp / "demo", rounds, [], "demo")
    except RuntimeError as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "?"
        return (f"| loopback, 3 sites, demo config, {rounds} rounds, resident runtime | - | FAILED: {last} | "
                f"load {loadavg()} |"), None
    row = (f"| loopback, 3 sites, demo config, {rounds} rounds, resident runtime | {r['rounds']} | "
           f"wall {r['wall_s']:.0f} s (start to report; round median {statistics.median(r['seconds']):.1f} s, "
           f"overhead median {statistics.median(r['overhead']):.1f} s) | load {r['load']} |")
    return row, r


def paper_model_state():
    """The paper-size UMEML (configs/grading.yaml: hidden 256, 1024-dim ResNet50 features, the
    MCAT gene groups of the TCGA GBM-LGG table) with its preprocessing; (state, prep, cfg)."""
    import pandas as pd
    import torch

    from umeml.config import load_config
    from umeml.data.genomics import build_gene_groups, read_signatures
    from umeml.train.experiment import Preprocessing, build_model
    from umeml.train.loop import task_heads

    cfg = load_config(REPO / "configs" / "grading.yaml")
    columns = list(pd.read_csv(TCGA / "tcga_gbmlgg_all_clean.csv.gz", nrows=0).columns)
    groups = build_gene_groups(columns, "signatures", read_signatures(TCGA / "signatures.csv"))
    rng = np.random.default_rng(0)
    dim = groups.dim
    prep = Preprocessing(survival_edges=[0.0, 10.0, 20.0, 40.0, 1e9], genomic_mean=rng.normal(size=dim).tolist(),
                         genomic_std=rng.uniform(0.5, 2, size=dim).tolist(), class_weights={"grade": [1.0, 1.2, 0.8]},
                         heads=task_heads(cfg, 3), feature_dim=1024, group_sizes=list(groups.sizes), subtypes=["a", "b", "c"],
                         grades=["II", "III", "IV"])
    torch.manual_seed(0)
    model = build_model(cfg, prep)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, prep, cfg


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of ``pids`` (processes that ended meanwhile count 0)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def idle_cpu(tmp: Path, flags: list[str], seconds: float) -> tuple[float, float]:
    """CPU use at idle (a SuperLink with one connected site, no run), as a share of one core:
    (the site's process tree, the SuperLink)."""
    from umeml.flower.processes import free_port, stop_process
    from umeml.server.deploy import SuperLink

    work = tmp / "idle"
    site = _prepare(work, 1)[0]
    link = SuperLink("127.0.0.1", free_port(), work / f"flower-{len(flags)}", work / "superlink.log").start()
    proc = None
    try:
        proc = subprocess.Popen([str(BIN / "umeml-client"), "start", "--site", f"{site}.yaml", "--server",
                                 f"127.0.0.1:{link.port}", "--port", str(free_port()), *flags], cwd=work,
                                start_new_session=True, stdout=(work / "site.log").open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 600
        while "joining" not in (work / "site.log").read_text() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(20)  # the SuperNode connects, the resident settles
        tree = descendants(proc.pid)
        site0, link0 = cpu_seconds(tree), cpu_seconds({link.proc.pid})
        time.sleep(seconds)
        return (cpu_seconds(tree) - site0) / seconds, (cpu_seconds({link.proc.pid}) - link0) / seconds
    finally:
        if proc is not None:
            stop_process(proc, grace=15)
        link.stop()


def idle_rows(tmp: Path, seconds: float) -> list[str]:
    """CPU at idle of both site runtimes and pollings."""
    rows = []
    for label, flags in IDLE_VARIANTS:
        site, link = idle_cpu(tmp, flags, seconds)
        rows.append(f"| idle site ({label}), SuperLink on the same machine | {seconds:.0f} s idle | "
                    f"CPU {100 * site:.1f}% of a core (the site's process tree), SuperLink "
                    f"{100 * link:.1f}% | load {loadavg()} |")
        print(rows[-1], flush=True)
    return rows


def serialized_bytes(message) -> int:
    """Bytes of a message as Flower transfers it: every object of its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def paper_bytes() -> dict:
    """One round's messages at paper size (fp32 transfer), as the coordinator and a site build
    them: the train message (global weights, experiment, preprocessing, the validation request),
    the held-out site's evaluate message, and the training reply (weights, metrics, report with
    the validation of the received weights)."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    from umeml.config import config_to_dict
    from umeml.flower.packing import pack
    from umeml.flower.records import arrays_from_state

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as inside a ServerApp
    state, prep, cfg = paper_model_state()
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    fp32 = 4 * n_params
    arrays = pack(arrays_from_state(state, fp16=False))  # as the coordinator's PackingGrid sends them
    base = {"experiment": json.dumps(config_to_dict(cfg)), "preprocessing": prep.to_json(), "server-round": 2,
            "validate-part": "val", "validate-n-boot": 0, "validate-round": 1}
    down = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(base)}), dst_node_id=1,
                   message_type=MessageType.TRAIN)
    held = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**base, "part": "all", "n-boot": 0})}),
                   dst_node_id=2, message_type=MessageType.EVALUATE)
    task = {"auc_macro": {"value": 0.8, "low": 0.7, "high": 0.9, "n": 40}}
    report = {"site": "A0", "train_loss": 1.0, "num-examples": 80, "steps": 10, "seconds": 5.0,
              "validation": {"site": "A0", "part": "val", "n": 20, "loss": 1.0, "tasks": {"grade": task},
                             "seconds": 0.5, "weights_round": 1}}
    up = Message(RecordDict({"arrays": pack(arrays_from_state(state, fp16=False)),
                             "metrics": MetricRecord({"num-examples": 80, "train_loss": 1.0}),
                             "report": ConfigRecord({"json": json.dumps(report)})}), dst_node_id=0,
                 message_type=MessageType.TRAIN)
    return {"params": n_params, "fp32_bytes": fp32, "tensors": len(state), "objects": len(get_all_nested_objects(down)),
            "down": serialized_bytes(down) / fp32,
            "held": serialized_bytes(held) / fp32, "up": serialized_bytes(up) / fp32}


def simulation_35_sites(work: Path, rounds: int) -> dict:
    """All 35 TSS sites of GBM-LGG (genomics) as virtual sites, two held out, 10 rounds."""
    import dataclasses

    from umeml.config import load_config
    from umeml.data.cohort import load_cohort
    from umeml.data.source import CohortSource
    from umeml.simulation import simulate

    cfg = load_config(REPO / "configs" / "gbmlgg_genomics.yaml")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds, train_sites=(),
                                                                  min_train_sites=1))
    table, sig = TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv"
    cohort = load_cohort(table, sig, None, cfg.data)
    t0 = time.perf_counter()
    with TreeMemory() as mem:
        final = simulate(cfg, cohort, CohortSource(table=str(table), signatures=str(sig)), work / "sim35")
    return {"sites": len(cohort.sites), "rounds": final["rounds"], "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": mem.peak_rss / 2**20, "seconds_per_round": final["seconds_per_round"]}


def _bytes_row() -> str:
    b = paper_bytes()
    goal = "met" if max(b["down"], b["held"], b["up"]) <= 1.05 else "NOT met"
    return (f"| paper-size UMEML ({b['params'] / 1e6:.2f}M parameters, {b['tensors']} tensors, fp32 transfer packed: "
            f"{b['objects']} Flower objects per train message) | "
            f"per round | per site: training site down {b['down']:.3f}x and up {b['up']:.3f}x, held-out site down "
            f"{b['held']:.3f}x the float32 model ({b['fp32_bytes'] / 1e6:.1f} MB); goal <= 1.05x {goal} | "
            "serialized message size, no load dependence |")


def earlier_row(path: Path | None, prefix: str) -> str | None:
    """The row starting with ``prefix`` in this script's section of ``path`` (from an earlier
    run), marked as such; None when there is none."""
    if path is None or not path.is_file():
        return None
    section = path.read_text().split(TITLE, 1)[-1].split("\n## ", 1)[0] if TITLE in path.read_text() else ""
    row = next((line for line in section.splitlines() if line.startswith(prefix)), None)
    if row is None or "(earlier run" in row:
        return row
    setup, rest = row.split(" | ", 1)
    return f"{setup} (earlier run, not rerun) | {rest}"


def main(argv=None) -> int:
    """Run the selected benchmarks, print a table, optionally write it as a section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each overhead deployment")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the two site runtimes")
    ap.add_argument("--demo-rounds", type=int, default=20)
    ap.add_argument("--skip-deploy", action="store_true", help="no overhead comparison")
    ap.add_argument("--skip-demo", action="store_true", help="no 20-round demo deployment")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--idle-seconds", type=float, default=60, help="CPU at idle over this long (0: skip)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, run dirs)")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    lines, default_runs, demo = [_bytes_row()], [], None
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.keep) if args.keep else scratch
        if args.idle_seconds > 0:
            lines += idle_rows(Path(tmp), args.idle_seconds)
        if not args.skip_deploy:
            rows, default_runs = overhead_rows(Path(tmp), args.rounds, args.repeats)
            lines += rows
            print("\n".join(rows), flush=True)
        if not args.skip_demo:
            row, demo = demo_row(Path(tmp), args.demo_rounds)
            lines.append(row)
            print(row, flush=True)
        if not args.skip_sim and TCGA.is_dir():
            r = simulation_35_sites(Path(tmp), 10)
            lines.append(f"{SIM_ROW} {r['sites']} GBM-LGG TSS sites, genomics | {r['rounds']} | "
                         f"wall {r['wall_s']:.0f} s ({np.mean(r['seconds_per_round']):.1f} s/round) | "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB (process tree), load {loadavg()} |")
            print(lines[-1], flush=True)
        elif args.skip_sim and earlier_row(args.write, SIM_ROW):
            lines.append(earlier_row(args.write, SIM_ROW))  # kept as it was measured
    if args.write:
        write_section(args.write, TITLE, f"Command: `{command(MODULE, argv)}`\n\n"
                      "| setup | rounds | result | load average (1, 5, 15 min) |\n| --- | --- | --- | --- |\n"
                      + "\n".join(lines) + "\n\n" + NOTES + "\n" + goals_text(default_runs, demo, args.demo_rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

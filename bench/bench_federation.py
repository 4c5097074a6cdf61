"""Federation benchmarks: deployment overhead per round on loopback, bytes per round per site,
and a 35-site GBM-LGG simulation (wall time, peak memory).

    python -m bench.bench_federation [--skip-deploy] [--skip-sim] [--rounds 3] [--write docs/benchmarks.md]

Overhead per round = round wall time minus the slowest site's local compute (training plus
evaluation), measured inside the coordinator. Bytes come from the SuperLink's own accounting
(`flwr ls` network traffic), compared with the model's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import REPO, TCGA, TreeMemory, command, write_section

MODULE = "bench.bench_federation"
TITLE = "## Federation"
BIN = Path(sys.executable).parent

EXPERIMENT = """\
tasks: [grade, subtype, survival]
split: {{test_sites: [A2]}}
data: {{max_patches: 64}}
model: {{hidden_dim: 32, n_prototypes: 5, n_registers: 3}}
train: {{batch_size: 8, lr: 0.002, bootstrap: 50}}
federation: {{rounds: {rounds}, local_epochs: 1, min_train_sites: 1, k_min_patients: 5, fp16_transfer: {fp16}}}
"""


def deployment(work: Path, rounds: int, fp16: bool) -> dict:
    """SuperLink + 3 SuperNodes on 127.0.0.1; returns per-round timings and traffic."""
    from umeml.data.synth import SynthSpec, generate, split_by_site
    from umeml.flower.processes import free_port, stop_process

    generate(SynthSpec(sites=3, patients=30, seed=0, feature_dim=64, median_patches=100), work / "all", overwrite=True)
    ids = split_by_site(work / "all", work / "sites")
    for s in ids:
        (work / f"{s}.yaml").write_text(
            f"site_id: {s}\ndata_dir: sites/{s}\ndevice: cpu\nk_min_patients: 5\nstate_dir: state/{s}\n")
    (work / "exp.yaml").write_text(EXPERIMENT.format(rounds=rounds, fp16=str(fp16).lower()))
    port = free_port()
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "umeml-server"), "start", "--config", "exp.yaml", "--sites", "3",
                                   "--out", "run", "--port", str(port)], cwd=work, start_new_session=True,
                                  stdout=(work / "server.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(server)
        time.sleep(2)
        for s in ids:
            procs.append(subprocess.Popen([str(BIN / "umeml-client"), "start", "--site", f"{s}.yaml", "--server",
                                           f"127.0.0.1:{port}", "--port", str(free_port())], cwd=work,
                                          start_new_session=True, stdout=(work / f"{s}.log").open("wb"),
                                          stderr=subprocess.STDOUT))
        if server.wait(timeout=1800) != 0:
            raise RuntimeError((work / "server.log").read_text())
    finally:
        for p in procs:
            stop_process(p, grace=15)
    final = json.loads((work / "run" / "final.json").read_text())
    runs = json.loads((work / "run" / "flower-run.json").read_text())["runs"]
    import torch

    ck = torch.load(work / "run" / "resume.pt", weights_only=True)
    model_bytes = sum(v.numel() * v.element_size() for v in ck["weights"].values())
    traffic = runs[-1]["network-traffic"]
    n_train, n_all = 2, 3
    return {
        "rounds": rounds,
        "fp16": fp16,
        "seconds_per_round": final["seconds_per_round"],
        "overhead_per_round": final["overhead_seconds_per_round"],
        "model_bytes": model_bytes,
        "outbound_bytes": traffic["outbound-bytes"],
        "inbound_bytes": traffic["inbound-bytes"],
        # server->site: a train message per training site and an evaluate message per site per round
        "down_ratio": traffic["outbound-bytes"] / (rounds * (n_train + n_all) * model_bytes),
        # site->server: weights from each training site per round
        "up_ratio": traffic["inbound-bytes"] / (rounds * n_train * model_bytes),
    }


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


def _deploy_rows(tmp: Path, rounds: int) -> list[str]:
    """One table row per transfer precision (fp32, fp16) of a loopback deployment."""
    lines = []
    for fp16 in (False, True):
        work = tmp / f"deploy-{int(fp16)}"
        work.mkdir()
        r = deployment(work, rounds, fp16)
        lines.append(
            f"| loopback, 3 sites, fp16_transfer={str(fp16).lower()} | rounds {r['rounds']} | "
            f"round {np.mean(r['seconds_per_round']):.1f} s, overhead {np.mean(r['overhead_per_round']):.1f} s "
            f"(per round: {', '.join(f'{x:.1f}' for x in r['overhead_per_round'])}) | "
            f"model {r['model_bytes'] / 1e3:.0f} kB; down {r['down_ratio']:.2f}x, up {r['up_ratio']:.2f}x "
            "model per site per round |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    """Run the selected benchmarks, print a table, optionally write it as a section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-deploy", action="store_true")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_deploy:
            lines += _deploy_rows(Path(tmp), args.rounds)
        if not args.skip_sim and TCGA.is_dir():
            r = simulation_35_sites(Path(tmp), 10)
            lines.append(f"| simulation, {r['sites']} GBM-LGG TSS sites, genomics | rounds {r['rounds']} | "
                         f"wall {r['wall_s']:.0f} s ({np.mean(r['seconds_per_round']):.1f} s/round) | "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB (process tree) |")
            print(lines[-1], flush=True)
    if args.write and lines:
        write_section(args.write, TITLE, f"Command: `{command(MODULE, argv)}`\n\n"
                      "| setup | rounds | time | size / memory |\n| --- | --- | --- | --- |\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``umeml-server`` command: the federation coordinator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from umeml import __version__
from umeml.config import STRATEGIES, ExperimentConfig, dump_config, load_config
from umeml.errors import ConfigError, DataValidationError, UsageError, report_input_error
from umeml.exitcodes import check_out_dir, check_run_dir, replace_run_dir, require_path, run_main
from umeml.logs import CONSOLE_LEVELS, set_console_level
from umeml.rundir import (
    FINAL_FILE,
    SUMMARY_METRICS,
    FederatedFinal,
    RunDir,
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    combined_note,
    format_metric,
    has_value,
    metric_entry,
    metrics_of_tasks,
    read_final,
    read_roles,
)
from umeml.server.deploy import (
    RunFailed,
    SuperLink,
    SuperLinkDied,
    TLSFiles,
    expand_site_keys,
    submit_and_wait,
    write_app_dir,
    write_run_config,
)
from umeml.server.runlock import RunDirBusy, RunGuard, handle_orphans
from umeml.server.supervise import SUPERVISED_ENV, run_supervised

PRIMARY = SUMMARY_METRICS  # the table's columns


def _fmt(m: dict | None) -> str:
    return format_metric(m, ci_digits=2)


def _summary_row(name: str, tasks: dict, columns=PRIMARY) -> tuple[str, str, list[str]]:
    """A combined or pooled row: n is the largest n among its metrics; a metric computed on fewer
    patients (a site dropped from a combined AUC) shows its own n."""
    n = max((m.get("n", 0) for t in tasks.values() if isinstance(t, dict) for m in t.values() if isinstance(m, dict)),
            default=0)
    cells = []
    for t, k in columns:
        m = metric_entry(tasks, t, k)
        cells.append(_fmt(m) + (f" n={m['n']}" if m and has_value(m) and m.get("n", n) != n else ""))
    return name, str(n), cells


def combined_notes(combined: dict) -> list[str]:
    """Lines under the table: the n each combined metric used and why sites were dropped, and the
    site bootstrap CIs (resampling sites) next to the patient-based ones of the table."""
    lines, boot = [], []
    for t, k in PRIMARY:
        m = metric_entry(combined, t, k)
        if not has_value(m):
            continue
        note = combined_note(m)
        if note:
            lines.append(f"combined {t} {k}: {note}")
        if m.get("site_ci_low") is not None:
            boot.append(f"{t} {k} [{m['site_ci_low']:.2f}, {m['site_ci_high']:.2f}] ({m.get('sites')} sites)")
    if boot:
        lines.append("combined, 95% CI resampling the held-out sites (site bootstrap): " + ", ".join(boot))
    return lines


def format_table(final: dict | FederatedFinal) -> str:
    """Held-out metrics per site, combined over sites and (simulation) pooled, with 95% CIs and n
    (``final``: a federated run's result, or its final.json dict). Only the experiment's tasks
    get columns."""
    rec = final if isinstance(final, FederatedFinal) else FederatedFinal.from_json(final)
    columns = metrics_of_tasks([rep.get("tasks") for rep in rec.held_out.values()]
                               + [rec.held_out_combined, rec.pooled], PRIMARY)
    rows = []
    for site, rep in sorted(rec.held_out.items()):
        if rep.get("suppressed"):
            rows.append((site, str(rep["n"]), ["suppressed (< k patients)"] + [""] * (len(columns) - 1)))
            continue
        rows.append((site, str(rep["n"]), [_fmt(metric_entry(rep["tasks"], t, k)) for t, k in columns]))
    if rec.held_out_combined:
        rows.append(_summary_row("combined", rec.held_out_combined, columns))
    if rec.pooled:
        rows.append(_summary_row("pooled", rec.pooled, columns))
    header = ("site", "n", [f"{t} {k}" for t, k in columns])
    widths = [max(len(r[0]) for r in rows + [header]), max(len(r[1]) for r in rows + [header])]
    cols = [max(len(r[2][i]) for r in rows + [header]) for i in range(len(columns))]
    lines = []
    for r in [header] + rows:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1])] + [c.ljust(w) for c, w in zip(r[2], cols)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + combined_notes(rec.held_out_combined or {}))


def demo_sites_for(cfg) -> int:
    """Sites of the generated demo cohort without ``--sites``: 4, or as many as the config's
    named sites need (configs/demo_dp.yaml names A0-A3 and leaves A4-A6 as its public sites)."""
    from umeml.data.synth import site_codes

    named = set(cfg.federation.train_sites) | set(cfg.split.test_sites)
    codes = site_codes(360)
    needed = max((codes.index(s) + 1 for s in named if s in codes), default=0)
    public = 3 if cfg.train.trainable != "all" and cfg.federation.init_checkpoint is None else 0
    return max(4, needed + public)


def _load_sim_cohort(args, cfg):
    """The simulation's cohort and its source (the synthetic demo cohort without --data/--table)."""
    from umeml.data.source import CohortSource
    from umeml.data.synth import SynthSpec, generate

    if args.data is None and args.table is None:
        data = Path(args.out) / "data"
        if not (data / "table.csv").is_file():
            sites = args.sites or demo_sites_for(cfg)
            print(f"no --data: generating the synthetic demo cohort ({sites} sites x {args.patients} patients) in {data}")
            generate(SynthSpec(sites=sites, patients=args.patients, seed=cfg.seed), data, overwrite=True)
        args.data = data
    source = CohortSource.from_args(args)
    return source.load(cfg.data, cfg.tasks, scan_features=True), source.resolved()


def _resumed_simulation(args: argparse.Namespace) -> tuple:
    """(config, cohort, source, held-out sets) of the run dir given with ``--resume``."""
    from umeml.data.source import CohortSource

    args.out = args.resume
    files = RunDir(args.resume)
    saved = json.loads(files.simulation.read_text())
    cfg = load_config(files.config)
    source = CohortSource.from_dict(saved["source"], f"{files.simulation}: source")
    cohort = source.load(cfg.data, cfg.tasks)
    held_sets = [tuple(saved["held_out"])]
    if args.rounds is not None:  # extend a finished run: --resume RUN_DIR --rounds N
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=args.rounds))
    if args.rounds is not None or _placement_flags(args):
        cfg = with_placement(cfg, args)  # a resumed simulation may run on another cluster
        atomic_write_text(files.config, dump_config(cfg))
    return cfg, cohort, source, held_sets


def _placement_flags(args: argparse.Namespace) -> dict:
    """The ``simulation`` keys the command line sets (--ray-address, --cpus/--gpus-per-site)."""
    flags = {"ray_address": args.ray_address, "cpus_per_site": args.cpus_per_site, "gpus_per_site": args.gpus_per_site}
    return {k: v for k, v in flags.items() if v is not None}


def with_placement(cfg: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """``cfg`` with the command line's Ray address and per-site resources."""
    flags = _placement_flags(args)
    if not flags:
        return cfg
    return dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, **flags))


def _new_simulation(args: argparse.Namespace) -> tuple:
    """(config with the command line's overrides, cohort, source, held-out sets) of a new simulation."""
    cfg = load_config(args.config, federated=True)
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=args.rounds))
    if args.strategy is not None:
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy=args.strategy))
    if args.dp_epsilon is not None:
        cfg = with_local_dp(cfg, args.dp_epsilon)
    cfg = with_placement(cfg, args)
    cohort, source = _load_sim_cohort(args, cfg)
    if args.leave_one_site_out:
        held_sets = [(s,) for s in (list(cfg.federation.train_sites) or cohort.sites)]
    else:
        held_sets = [None]
    return cfg, cohort, source, held_sets


def _cmd_simulate(args: argparse.Namespace) -> int:
    set_console_level(args.log_level or ("INFO" if args.verbose else "WARNING"))
    resume = args.resume is not None
    if not resume and args.config is None:
        print("error: umeml-server simulate needs --config (or --resume RUN_DIR)", file=sys.stderr)
        return 2
    problems = simulate_limits(args)
    if problems:
        return _report_problems(problems)
    try:
        if resume:
            require_path(args.resume, "--resume", "folder")
        earlier = [] if resume else check_run_dir(args.out, args.overwrite, resume_hint=True)
        cfg, cohort, source, held_sets = (_resumed_simulation if resume else _new_simulation)(args)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (UsageError, DataValidationError) as err:
        return report_input_error(err, "data check FAILED")
    replace_run_dir(args.out, earlier)  # only once the config and the data passed their checks
    if args.compare:
        return _simulate_comparison(args, cfg, cohort, source)
    for held in held_sets:
        run_dir = Path(args.out) if len(held_sets) == 1 else Path(args.out) / f"holdout-{held[0]}"
        rc = _simulate_run(args, cfg, cohort, source, run_dir, held, resume)
        if rc:
            return rc
    if len(held_sets) > 1 and not args.no_report:
        _write_reports([Path(args.out)])
    return 0


def simulate_limits(args: argparse.Namespace) -> list[str]:
    """The numeric flags of ``umeml-server simulate`` that no run can satisfy (each a usage error)."""
    problems = []
    if args.sites is not None and args.sites < 1:
        problems.append(f"--sites {args.sites}: the demo cohort needs at least 1 site")
    if args.patients < 1:
        problems.append(f"--patients {args.patients}: each site needs at least 1 patient")
    if args.rounds is not None and args.rounds < 1:
        problems.append(f"--rounds {args.rounds}: must be at least 1")
    if args.cpus_per_site is not None and not args.cpus_per_site > 0:
        problems.append(f"--cpus-per-site {args.cpus_per_site:g}: must be > 0")
    if args.gpus_per_site is not None and args.gpus_per_site < 0:
        problems.append(f"--gpus-per-site {args.gpus_per_site:g}: must be >= 0")
    if (args.gpus_per_site or 0) > 0 and args.device == "cpu":
        problems.append(f"--gpus-per-site {args.gpus_per_site:g} with --device cpu: the sites would reserve GPUs "
                        "and not use them (use --device cuda)")
    return problems


def _simulate_comparison(args: argparse.Namespace, cfg, cohort, source) -> int:
    """``--compare``: centralized, federated and local-only on the same held-out sites."""
    from umeml.simulation.compare import compare, format_comparison

    summary = compare(cfg, cohort, source, args.out, device=args.device)
    print(format_comparison(summary))
    if not args.no_report:
        _write_reports(sorted(p.parent for p in Path(args.out).glob(f"*/{FINAL_FILE}")) + [Path(args.out)])
    return 0


def _simulate_run(args: argparse.Namespace, cfg, cohort, source, run_dir: Path, held, resume: bool) -> int:
    """One simulation holding out ``held`` (None: by config and seed); prints its held-out table."""
    from umeml.server.public_init import format_privacy_totals, with_public_checkpoint
    from umeml.simulation import simulate

    if not resume:
        from umeml.server.simulate import plan_sites

        try:
            _, planned = plan_sites(cfg, cohort, held)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(run_dir).simulation, {"source": source.to_dict(), "held_out": list(planned)})
        held = planned
        _warn_missing_classes(cfg, cohort, planned)
        cfg = with_public_checkpoint(cfg, cohort, tuple(held), run_dir)
    final = simulate(cfg, cohort, source, run_dir, held_out=held, resume=resume, device=args.device)
    print(f"\nheld-out metrics after {final['rounds']} rounds ({final['strategy']}), run dir {run_dir}:")
    print(format_table(final))
    if totals := format_privacy_totals(final):
        print(totals)
    if not args.no_report:
        _write_reports([run_dir])
    return 0


def _warn_missing_classes(cfg, cohort, held) -> None:
    """A held-out set without a class makes its macro AUC a different quantity: say so up front."""
    from umeml.metrics.coverage import cohort_missing_classes, missing_class_message

    indices = [i for s in held for i in cohort.site_indices(s)]
    for task, missing in cohort_missing_classes(cohort, indices, cfg.tasks).items():
        print(f"warning: {missing_class_message('the held-out sites ' + ', '.join(held), task, missing)}", file=sys.stderr)


def with_local_dp(cfg, epsilon: float):
    """``cfg`` with local DP-SGD required at every site at budget ``epsilon`` (other DP keys kept)."""
    if not epsilon > 0:
        raise ConfigError(f"--dp-epsilon: must be > 0 (got {epsilon})")
    dp = dataclasses.replace(cfg.federation.local_dp, enabled=True, target_epsilon=float(epsilon))
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, local_dp=dp))


def _write_reports(run_dirs: list[Path]) -> None:
    """report.html for each run dir (a failure is printed; the runs' results stay on disk)."""
    from umeml.report import report_after_run

    for run_dir in run_dirs:
        report_after_run(run_dir)


def exposure_warning(host: str, port: int, tls: bool, auth: bool) -> str | None:
    """What to tell the operator about who can reach the SuperLink (None: loopback, TLS and auth).

    Flower 1.42 serves the Fleet (sites), Control (``flwr run/stop/ls``, ``flwr supernode
    register``) and Runtime APIs on one port; only the Fleet API checks who calls.
    """
    from umeml.server.certs import is_loopback

    if not is_loopback(host):
        return (f"WARNING: the SuperLink listens on {host}:{port}, beyond loopback. "
                + ("Traffic is NOT encrypted (no --tls-dir) and " if not tls else "")
                + "Flower's Control API on this port has no authentication in open source: anyone who reaches "
                "it can submit or stop runs and register site keys. Keep it on an admin network, or keep "
                "--host 127.0.0.1 and expose only /v1/fleet/ through a reverse proxy (see the deployment docs).")
    if tls and not auth:
        return "note: TLS on but SuperNode authentication off (no --site-keys): any node trusting ca.crt may join"
    return None


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """What ``umeml-server start`` runs, once its preflight found no problem."""

    run_dir: Path
    cfg: ExperimentConfig
    held_out: tuple[str, ...]
    tls: TLSFiles | None
    site_keys: list[Path]


def preflight_start(args: argparse.Namespace) -> tuple[StartPlan | None, list[str]]:
    """Check everything ``umeml-server start`` needs before anything starts.

    Returns the plan (None when a problem was found) and every problem found, one line each,
    so the operator fixes them all in one pass. Each is a usage error (a flag, or the config,
    TLS or key file a flag names): the command exits 2 on any of them.
    """
    problems: list[str] = start_limits(args)
    cfg = _start_config(args, problems)
    _start_out(args, problems)
    tls = _start_tls(args, problems)
    site_keys = _start_site_keys(args, problems)
    held = _start_held_out(args, cfg, problems)
    if problems:
        return None, problems
    return StartPlan(args.resume or args.out, cfg, held, tls, site_keys), []


def start_limits(args: argparse.Namespace) -> list[str]:
    """The numeric flags of ``umeml-server start`` that no run can satisfy (each a usage error)."""
    problems = []
    if args.sites < 1:
        problems.append(f"--sites {args.sites}: a federation needs at least 1 site to wait for")
    if args.rounds is not None and args.rounds < 1:
        problems.append(f"--rounds {args.rounds}: must be at least 1")
    if not 0 < args.port < 65536:
        problems.append(f"--port {args.port}: not a TCP port (1-65535)")
    if not args.wait_timeout > 0:
        problems.append(f"--wait-timeout {args.wait_timeout:g}: must be > 0 seconds")
    return problems


def _start_held_out(args: argparse.Namespace, cfg: ExperimentConfig | None, problems: list[str]) -> tuple[str, ...]:
    """The held-out sites: on resume the ones the run recorded (``--held-out`` may only repeat
    them), else ``--held-out`` or the config's ``split.test_sites``; with neither, the coordinator
    holds out ``split.n_test_sites`` of the sites that join (checked here against ``--sites``)."""
    given = tuple(sorted(s for s in (args.held_out or "").split(",") if s))
    if args.resume is not None:
        try:
            roles = read_roles(args.resume)
        except RunDirError as err:
            problems.append(str(err))
            return given
        if roles is not None:
            if given and given != tuple(sorted(roles.held_out)):
                problems.append(f"--held-out {','.join(given)}: {args.resume} holds out "
                                f"{','.join(roles.held_out) or 'no site'}; a resumed run keeps its held-out sites "
                                "(leave --held-out out, or start a new run with --out)")
            return tuple(roles.held_out)
    if given or cfg is None:
        return given
    if not cfg.split.test_sites and 1 <= args.sites <= cfg.split.n_test_sites:
        # the coordinator holds out split.n_test_sites of the joined sites (server/heldout.py)
        problems.append(f"split.n_test_sites {cfg.split.n_test_sites} of --sites {args.sites}: no site would be left to "
                        "train; hold out fewer (split.n_test_sites), or name them (split.test_sites, --held-out)")
    return tuple(cfg.split.test_sites)


def _start_config(args: argparse.Namespace, problems: list[str]) -> ExperimentConfig | None:
    if args.resume is None and args.config is None:
        problems.append("umeml-server start needs --config or --resume")
        return None
    try:
        cfg = load_config(args.resume / "config.yaml" if args.resume else args.config, federated=True)
    except ConfigError as err:
        problems.append(str(err))
        return None
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=args.rounds))
    return cfg


def _start_out(args: argparse.Namespace, problems: list[str]) -> None:
    """A new run's --out: not a file, and no earlier run in it unless --overwrite."""
    if args.resume is None:
        try:
            check_run_dir(args.out, args.overwrite, resume_hint=True)
        except UsageError as err:
            problems.append(str(err))


def _start_tls(args: argparse.Namespace, problems: list[str]) -> TLSFiles | None:
    from umeml.server.certs import certificate_names, names_host

    if args.tls_dir is None:
        return None
    tls = TLSFiles(args.tls_dir / "ca.crt", args.tls_dir / "server.pem", args.tls_dir / "server.key")
    missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
    if missing:
        problems.append(f"TLS files missing: {', '.join(missing)} (create them with `umeml-server certs`)")
        return tls
    try:
        names = certificate_names(tls.server_cert)
    except ValueError as err:
        problems.append(f"{tls.server_cert} is not a PEM certificate ({err}); create it with `umeml-server certs`")
        return tls
    if not names_host(names, args.host):  # Flower's own SuperExec dials --host with this certificate
        problems.append(f"{tls.server_cert} is not valid for --host {args.host} (it names {', '.join(names)}); "
                        f"re-create it with `umeml-server certs --host {args.host}`")
    return tls


def _start_site_keys(args: argparse.Namespace, problems: list[str]) -> list[Path]:
    if args.site_keys is None:
        return []
    if args.tls_dir is None:
        problems.append("--site-keys needs --tls-dir (Flower authenticates sites only over TLS)")
    try:
        site_keys = expand_site_keys(args.site_keys)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"--site-keys: {err}")
        return []
    if not site_keys:
        problems.append("--site-keys given without any key file")
    return site_keys


def _report_problems(problems: list[str]) -> int:
    """Print every preflight problem (one as ``error: ...``, several as a list); exit code 2."""
    if len(problems) == 1:
        print(f"error: {problems[0]}", file=sys.stderr)
    else:
        print(f"error: {len(problems)} problems, nothing started:\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)
    return 2


def _cmd_start(args: argparse.Namespace) -> int:
    plan, problems = preflight_start(args)
    if plan is None:
        return _report_problems(problems)
    if args.resume is None:  # --overwrite, checked in the preflight
        replace_run_dir(plan.run_dir, RunDir(plan.run_dir).existing_outputs())
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    warning = exposure_warning(args.host, args.port, plan.tls is not None, bool(plan.site_keys))
    if warning:
        print(warning, file=sys.stderr)
    # a SIGTERM (service manager, `timeout`) must still stop the SuperLink in _run_deployment's finally
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return _run_deployment(args, plan)


class _ProgressEcho:
    """Copies what the coordinator appended to ``progress.log`` since the last call to stdout."""

    def __init__(self, path: Path):
        self.path = path
        self.shown = path.stat().st_size if path.exists() else 0

    def __call__(self) -> None:
        if self.path.exists() and self.path.stat().st_size > self.shown:
            with self.path.open() as f:
                f.seek(self.shown)
                sys.stdout.write(f.read())
                self.shown = f.tell()
            sys.stdout.flush()


def _run_deployment(args: argparse.Namespace, plan: StartPlan) -> int:
    """Hold the run dir (lock, no orphans, watchdog), run the deployment, print its table."""
    files = RunDir(plan.run_dir)
    try:
        with RunGuard(files, args.force) as guard:  # RunDirBusy comes from entering only
            outcome = _deploy(args, plan, files, guard)
    except RunDirBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(outcome, int):
        return outcome
    run_id, status, log_path = outcome
    final_path = files.final
    if status != "finished:completed" or not final_path.is_file():
        print(f"error: run {run_id} ended as {status}; see {log_path}", file=sys.stderr)
        return 1
    final = read_final(final_path).to_json()
    print(f"\nheld-out metrics after {final['rounds']} rounds ({final['strategy']}), run dir {plan.run_dir}:")
    print(format_table(final))
    if not args.no_report:
        _write_reports([plan.run_dir])
    return 0


SUPERLINK_RESTARTS = 3  # a SuperLink that dies more often than this ends the run


def _deploy(args: argparse.Namespace, plan: StartPlan, files: RunDir, guard: RunGuard):
    """Start the SuperLink, submit the app and wait for the run: (run id, status, SuperLink log),
    or exit code 1 when Flower's processes fail; the SuperLink is stopped in every case.

    A SuperLink that dies mid-run is started again on the same port and database (the sites'
    SuperNodes reconnect by themselves) and the run is submitted again as a resume, which goes
    on from the last completed round.
    """
    link = SuperLink(args.host, args.port, files.flower_state, files.superlink_log, tls=plan.tls,
                     node_auth=bool(plan.site_keys))
    show_progress = _ProgressEcho(files.progress)
    resume, restarts = args.resume is not None, 0
    try:
        link.start(site_keys=plan.site_keys)
        guard.started(link)
        _announce_superlink(args, link, plan)
        while True:
            try:
                run_id, status = _submit(args, plan, files, link, resume, show_progress)
                if status != "finished:failed" or not 0 < restarts < SUPERLINK_RESTARTS:
                    break
                # a restarted SuperLink can fail the resumed run on its own (task tokens that
                # expired while its database was locked): one more resume, counted as a restart
                restarts += 1
                print(f"warning: run {run_id} failed after a SuperLink restart; submitting it again as a resume "
                      f"(restart {restarts} of at most {SUPERLINK_RESTARTS})", file=sys.stderr, flush=True)
            except SuperLinkDied as err:
                restarts += 1
                if restarts > SUPERLINK_RESTARTS:
                    raise RunFailed(f"{err}; it died {restarts} times, giving up") from err
                print(f"warning: {err}; starting it again and resuming the run from its last completed round "
                      f"(restart {restarts} of at most {SUPERLINK_RESTARTS})", file=sys.stderr, flush=True)
                link.stop()
                handle_orphans(files, force=True, printer=print, grace=5.0)  # its SuperExec and ServerApp
                link.restart()
                guard.started(link)
                resume = True
    except (RunFailed, RuntimeError, TimeoutError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        link.stop()
    return run_id, status, link.log_path


def _submit(args: argparse.Namespace, plan: StartPlan, files: RunDir, link, resume: bool,
            show_progress) -> tuple[int, str]:
    """Submit the app once and wait for the run; keeps Flower's accounting in flower-run.json."""
    app_dir = write_app_dir(files.app)
    run_config = write_run_config(files.run_config, plan.cfg, plan.run_dir, args.sites, plan.held_out,
                                  resume, args.wait_timeout)
    final_path = files.final
    run_id, status = submit_and_wait(link, app_dir, run_config, on_poll=show_progress,
                                     done_marker=None if final_path.exists() else final_path)
    show_progress()
    ls = link.flwr("ls", link.connection, "--run-id", str(run_id), "--format", "json")
    if ls.returncode == 0 and "{" in ls.stdout:
        # Flower's own accounting of the run (status, network traffic, compute time)
        atomic_write_text(files.flower_run, ls.stdout[ls.stdout.index("{"):])
    return run_id, status


def _announce_superlink(args: argparse.Namespace, link, plan: StartPlan) -> None:
    if plan.site_keys:
        print(f"registered site keys: {', '.join(sorted(link.registered))} (only these may join)")
    mode = "TLS" if plan.tls else "insecure, loopback/testing only"
    if plan.site_keys:
        mode += ", SuperNode authentication on"
    print(f"SuperLink on {args.host}:{args.port} ({mode}); waiting for {args.sites} site(s); log {link.log_path}",
          flush=True)


def _cmd_certs(args: argparse.Namespace) -> int:
    from umeml.server.certs import CertError, create_certs

    check_out_dir(args.out)
    sites = [s.strip() for s in (args.sites or "").split(",") if s.strip()]
    if args.keys_only and not sites:
        print("error: --keys-only needs --sites", file=sys.stderr)
        return 2
    try:
        bundle = create_certs(args.out, sites, args.host or [], force=args.force, keys_only=args.keys_only,
                              server_only=args.server_only, days=args.days)
    except CertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bundle.ca_cert is not None:
        print(f"CA certificate   {bundle.ca_cert}  (give to every site)")
        print(f"CA key           {bundle.ca_key}  (keep secret, offline)")
    if bundle.server_cert is not None:
        print(f"SuperLink        {bundle.server_cert} + {bundle.server_key}  (names: {', '.join(bundle.san)})")
    for site, (private, public) in bundle.site_keys.items():
        print(f"site {site:<11} {private}  (private: to this site only)  {public}  (public: register it)")
    if bundle.server_cert is not None:
        print(f"coordinator: umeml-server start ... --tls-dir {args.out}"
              + (f" --site-keys {Path(args.out) / 'sites'}" if sites else ""))
    if sites:
        print(f"each site:   umeml-client start ... --root-certificates {Path(args.out) / 'ca.crt'} "
              f"--auth-key {Path(args.out) / 'sites' / '<site>'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``umeml-server``."""
    parser = argparse.ArgumentParser(prog="umeml-server", description="umeml federation coordinator")
    parser.add_argument("--version", action="version", version=f"umeml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate_parser(sub)
    _add_start_parser(sub)
    _add_certs_parser(sub)
    return parser


def _add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a federation on this machine (Flower's simulation engine)")
    p.add_argument("--config", type=Path, help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--data", type=Path, help="data directory; without it the synthetic demo cohort is generated")
    p.add_argument("--table", type=Path, help="cohort table CSV instead of --data (genomics only without --bags)")
    p.add_argument("--signatures", type=Path, help="gene-group signatures CSV (with --table)")
    p.add_argument("--bags", type=Path, help="feature bag directory (with --table)")
    p.add_argument("--out", type=Path, default=Path("runs/simulation"),
                   help="run directory, a new one (default runs/simulation)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a simulation from its last completed round")
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--strategy", choices=STRATEGIES, help="override federation.strategy")
    p.add_argument("--dp-epsilon", type=float, metavar="EPS",
                   help="local DP-SGD at every virtual site with this total budget (sets federation.local_dp)")
    p.add_argument("--leave-one-site-out", action="store_true", help="one simulation per site, each holding that site out")
    p.add_argument("--compare", action="store_true",
                   help="run centralized, federated and local-only (each training site alone) on the same held-out sites")
    p.add_argument("--sites", type=int, help="sites of the generated demo cohort (default 4, or what the config's "
                                             "named sites need: configs/demo_dp.yaml 7, A4-A6 public)")
    p.add_argument("--patients", type=int, default=60, help="patients per site of the generated demo cohort (default 60)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="device of the virtual sites")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="join this Ray cluster (`ray start --head` on one machine, `ray start --address` on the "
                        "others) instead of starting Ray here; overrides simulation.ray_address")
    p.add_argument("--cpus-per-site", type=float, help="CPUs each virtual site reserves (simulation.cpus_per_site)")
    p.add_argument("--gpus-per-site", type=float,
                   help="GPUs each virtual site reserves, a fraction shares one (simulation.gpus_per_site; "
                        "needs --device cuda)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    _add_console_options(p)
    p.set_defaults(func=_cmd_simulate)


def _add_console_options(p) -> None:
    """``--verbose`` / ``--log-level``: what the console shows (RUN_DIR/run.log gets everything anyway)."""
    p.add_argument("--log-level", type=str.upper, choices=CONSOLE_LEVELS, default=None,
                   help="console level of umeml's, Flower's and Ray's log lines (default WARNING; run.log gets all)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's INFO lines (as --log-level INFO)")


def _add_start_parser(sub) -> None:
    p = sub.add_parser("start", help="coordinate real sites: start Flower's SuperLink and run the federation")
    p.add_argument("--config", type=Path, help="experiment YAML")
    p.add_argument("--sites", type=int, required=True, help="number of sites to wait for")
    p.add_argument("--out", type=Path, default=Path("runs/federation"), help="run directory, a new one")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last completed round")
    p.add_argument("--held-out", help="comma-separated held-out site ids (default: split.test_sites)")
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument("--tls-dir", type=Path, help="folder with ca.crt, server.pem, server.key (TLS on)")
    p.add_argument("--site-keys", type=Path, nargs="*",
                   help="sites' OpenSSH public keys (.pub files, or folders of them) to register: SuperNode "
                        "authentication on, only these sites may join; needs --tls-dir")
    p.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait for the sites (default 600)")
    p.add_argument("--force", action="store_true",
                   help="stop Flower processes (SuperLink, SuperExec, ServerApp) that an earlier coordinator of "
                        "this run dir left running, instead of refusing to start")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.set_defaults(func=_cmd_start)


def _add_certs_parser(sub) -> None:
    p = sub.add_parser("certs", help="create the CA, the SuperLink certificate and the sites' keys (TLS + site auth)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write (ca.crt, ca.key, server.pem, server.key, sites/)")
    p.add_argument("--sites", help="comma-separated site ids: one OpenSSH EC P-384 key pair each, sites/<id>{,.pub}")
    p.add_argument("--host", action="append", metavar="NAME_OR_IP",
                   help="a name or address the sites dial, added to the certificate (repeatable; "
                        "127.0.0.1, ::1 and localhost are always in)")
    p.add_argument("--keys-only", action="store_true",
                   help="only the sites' key pairs (a new site, a key rotation); CA and certificate left alone")
    p.add_argument("--server-only", action="store_true",
                   help="only a new SuperLink certificate, issued by the existing CA (renewal, new --host names); "
                        "the sites keep their ca.crt")
    p.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate in days (default 825)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys and certificates")
    p.set_defaults(func=_cmd_certs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``umeml-server`` console script."""
    if argv is None and _subcommand(sys.argv[1:]) == "simulate" and os.environ.get(SUPERVISED_ENV) != "1":
        # the console script: the simulation runs in a child that SIGTERM stops in seconds
        return run_supervised([sys.executable, "-m", "umeml.server.cli", *sys.argv[1:]])
    return run_main(build_parser(), argv)


def _subcommand(argv: list[str]) -> str | None:
    """The first word of ``argv`` that is not an option (the subcommand), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


if __name__ == "__main__":
    sys.exit(main())

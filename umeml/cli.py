"""The ``umeml`` command: synth (synthetic cohort), check (validate a cohort), train (centralized)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from umeml import __version__
from umeml.config import load_config
from umeml.data.source import CohortSource
from umeml.errors import ConfigError, DataValidationError, report_input_error
from umeml.exitcodes import check_out_dir, check_run_dir, replace_run_dir, run_main
from umeml.rundir import CentralizedFinal, format_metric, has_value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="data directory as `umeml synth` writes it (table.csv, signatures.csv, bags/)")
    p.add_argument("--table", type=Path, help="cohort table CSV (PORPOISE style), instead of --data")
    p.add_argument("--signatures", type=Path, help="gene-group signatures CSV (with --table)")
    p.add_argument("--bags", type=Path, help="feature bag directory (with --table); omit for genomics only")
    p.add_argument("--config", type=Path, help="experiment YAML (its data section applies to check)")


def _cmd_synth(args: argparse.Namespace) -> int:
    from umeml.data.synth import SynthSpec, generate

    spec = SynthSpec(
        sites=args.sites, patients=args.patients, seed=args.seed, feature_dim=args.feature_dim,
        median_patches=args.median_patches, min_patches=args.min_patches, max_patches=args.max_patches,
        missing_fraction=args.missing_fraction, clustered=args.clustered is not None,
        clustered_variant=args.clustered or "mosaic",
        tumour_fraction=tuple(args.tumour_fraction) if args.tumour_fraction else None,
    )
    check_out_dir(args.out)
    t0 = time.perf_counter()
    try:
        summary = generate(spec, args.out, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['patients']} patients, {summary['slides']} slides, {summary['sites']} sites "
          f"to {summary['out']} in {time.perf_counter() - t0:.1f} s")
    if args.split_sites is not None:
        from umeml.data.synth import split_by_site

        sites = split_by_site(args.out, args.split_sites)
        print(f"one data directory per site under {args.split_sites}: {', '.join(sites)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config) if args.config else None
        cohort = CohortSource.from_args(args).load(cfg and cfg.data, cfg and cfg.tasks, scan_features=True)
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        return report_input_error(err, "check FAILED")
    summary = cohort.summary()
    if args.table is not None and args.bags is None and summary["slides"]:
        print(f"note: genomics only: no --bags given, the table's {summary['slides']} slides are not read",
              file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"check OK: {summary['patients']} patients, {summary['slides']} slides, {summary['sites']} sites")
    print("patients per site: " + ", ".join(f"{k}={v}" for k, v in summary["patients_per_site"].items()))
    if summary["labels_needed"] or summary["subtype_missing"] < summary["patients"]:
        print("subtypes: " + ", ".join(f"{k}={v}" for k, v in summary["subtype_counts"].items())
              + (f", missing={summary['subtype_missing']}" if summary["subtype_missing"] else ""))
        print("grades: " + ", ".join(f"{k}={v}" for k, v in summary["grade_counts"].items()))
    else:
        print("subtypes: none (not needed by the tasks)")
    if summary["survival_needed"]:
        print(f"censored: {summary['censored_fraction']:.0%}")
    else:
        print("survival: not read (not needed by the tasks)")
    print(f"modalities: pathology {summary['with_pathology']}/{summary['patients']}, "
          f"genomics {summary['with_genomics']}/{summary['patients']}")
    print(f"feature dim: {summary['feature_dim'] or '-'} (encoder {summary['encoder'] or '-'}); "
          f"genomic features: {summary['table_genomic_columns']} in the table, "
          f"{summary['genomic_features']} used in {len(summary['gene_groups'])} group(s)")
    if summary["imputed_genomic_values"]:
        print(f"imputed genomic values (median): {summary['imputed_genomic_values']}")
    return 0


def _with_init_checkpoint(cfg, path: Path | None):
    """``--init-checkpoint`` sets ``federation.init_checkpoint`` (the same key a federation reads)."""
    if path is None:
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, init_checkpoint=str(path)))


def _cmd_train(args: argparse.Namespace) -> int:
    from umeml.model.parts import CheckpointMismatch, PartError
    from umeml.train.central import train_central

    if args.config is None:
        print("error: umeml train needs --config (e.g. configs/demo.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        if args.seed is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, seed=args.seed)
        earlier = check_run_dir(args.out, args.overwrite)
        cfg = _with_init_checkpoint(cfg, args.init_checkpoint)
        cohort = CohortSource.from_args(args).load(cfg.data, cfg.tasks, scan_features=True)
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        return report_input_error(err, "data check FAILED")
    replace_run_dir(args.out, earlier)  # only once the config and the data passed their checks
    try:
        final = train_central(cfg, cohort, args.out, progress=not args.quiet)
    except (ValueError, CheckpointMismatch, PartError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_final(final))
    print(f"run directory: {args.out}")
    if not args.no_report:
        from umeml.report import report_after_run

        report_after_run(args.out)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from umeml.report import Options, ReportError, write_report

    if (args.features is not None or args.checkpoint is not None) and args.slide is None:
        print("error: --features and --checkpoint only make sense with --slide", file=sys.stderr)
        return 2
    try:
        out = write_report(args.run_dir, Options(risk_groups=args.risk_groups, slide=args.slide,
                                                 features=args.features, checkpoint=args.checkpoint))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


def format_final(final: dict | CentralizedFinal) -> str:
    """A short table of test metrics with 95% CIs (``final``: a centralized run's result, or its final.json dict)."""
    rec = final if isinstance(final, CentralizedFinal) else CentralizedFinal.from_json(final)
    lines = [f"{rec.MODE} {rec.model}: test sites {', '.join(rec.test_sites)} (n={rec.n_test})"]
    for task, metrics in rec.test.items():
        if "error" in metrics:
            lines.append(f"  {task:9s} not computable: {metrics['error']}")
            continue
        parts = [f"{name} {format_metric(m)}" for name, m in metrics.items() if has_value(m)]
        lines.append(f"  {task:9s} " + "; ".join(parts))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``umeml``."""
    parser = argparse.ArgumentParser(prog="umeml", description="umeml: multimodal glioma models, data tools and reports")
    parser.add_argument("--version", action="version", version=f"umeml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic TCGA-like cohort (table, signatures, feature bags, oracle)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    p.add_argument("--patients", type=int, default=60, help="patients per site (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed; the cohort is a pure function of it")
    p.add_argument("--feature-dim", type=int, default=64, help="patch feature dimension (default 64)")
    p.add_argument("--median-patches", type=int, default=300, help="median bag size (default 300)")
    p.add_argument("--min-patches", type=int, default=16, help="smallest bag (default 16)")
    p.add_argument("--max-patches", type=int, default=2000, help="largest bag (default 2000)")
    p.add_argument("--missing-fraction", type=float, default=0.03,
                   help="fraction of patients without slides, and again without genomics (default 0.03)")
    p.add_argument("--clustered", nargs="?", const="mosaic", choices=("mosaic", "foci", "arrangement"),
                   help="spatially clustered morphotypes (off by default): 'mosaic' (the default variant), a "
                        "tumour/background mosaic, 'foci', 2-10%% tumour in compact foci, necrotic cores in grade IV, or "
                        "'arrangement', 20-50%% tumour whose layout (scattered / masses / necrotic masses) is the grade")
    p.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="with --clustered: range of the per-patient tumour share (mosaic: of the regions, "
                        "0.05 0.4; foci: of the patches, 0.02 0.1; arrangement: of the patches, 0.2 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--split-sites", type=Path, metavar="DIR",
                   help="also write one data directory per site under DIR (to stage a local deployment)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("check", help="validate a cohort and print a summary; exit 1 listing every problem")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("train", help="centralized training with a site-disjoint test split (the reference run)")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="run directory to write (a new one, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --out (its final.json, metrics.csv, checkpoints/, report ...)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.add_argument("--init-checkpoint", type=Path, metavar="PATH",
                   help="start from this umeml.model checkpoint of the same architecture (federation.init_checkpoint)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a run dir of umeml train, umeml-server simulate/start, --compare or --leave-one-site-out")
    p.add_argument("--risk-groups", choices=("median", "tertiles"), default="median",
                   help="split held-out patients by predicted risk for the Kaplan-Meier plot (default median)")
    p.add_argument("--slide", type=Path, help="a whole-slide image: adds a prototype-attention heatmap over its thumbnail")
    p.add_argument("--features", type=Path, help="the slide's h5 feature bag (with coords), needed with --slide")
    p.add_argument("--checkpoint", type=Path,
                   help="model for the heatmap (default RUN_DIR/checkpoints/global.pt, else best.pt)")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``umeml`` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

"""Run reports: ``report.html`` (self-contained) and ``plots/*.png`` from a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from umeml.report.build import REPORT_FILE, Options, ReportError, write_report
from umeml.report.predictions import PREDICTIONS_FILE, load_predictions, save_predictions

__all__ = ["Options", "PREDICTIONS_FILE", "REPORT_FILE", "ReportError", "load_predictions", "report_after_run",
           "save_predictions", "write_report"]


def report_after_run(run_dir: str | Path) -> Path | None:
    """Write the report at the end of a run; a failure is printed, not raised, so the run's
    own results (already on disk) are never lost to a plotting problem."""
    try:
        out = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - reported to the user right here, with the way to retry
        print(f"warning: report not written ({type(err).__name__}: {err}); retry with `umeml report {run_dir}`",
              file=sys.stderr)
        return None
    print(f"report: {out}")
    return out

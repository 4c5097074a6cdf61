import shutil
import subprocess
import sys

import pandas as pd
import pytest

from umeml.cli import main


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["synth", "--out", str(out), "--sites", "2", "--patients", "6", "--seed", "0",
                 "--feature-dim", "8", "--median-patches", "20", "--max-patches", "50", "--min-patches", "4"]) == 0
    assert main(["check", "--data", str(out)]) == 0
    text = capsys.readouterr().out
    assert "check OK: 12 patients" in text and "patients per site: A0=6, A1=6" in text
    assert "feature dim: 8" in text and "modalities:" in text


def test_check_reports_all_problems_and_exits_nonzero(tiny_cohort_dir, tmp_path, capsys):
    d = tmp_path / "c"
    shutil.copytree(tiny_cohort_dir, d)
    df = pd.read_csv(d / "table.csv", dtype={"slide_id": str})
    slide = df["slide_id"].dropna().iloc[0]
    p = d / "bags" / f"{slide}.h5"
    p.write_bytes(p.read_bytes()[:200])
    df.loc[df["case_id"] == df.loc[2, "case_id"], "survival_months"] = -1
    df.to_csv(d / "table.csv", index=False)
    assert main(["check", "--data", str(d)]) == 1
    err = capsys.readouterr().err
    assert "problem(s)" in err and slide in err and "survival_months must be >= 0" in err


def test_check_real_table_genomics_only(tcga_dir, capsys):
    rc = main(["check", "--table", str(tcga_dir / "tcga_gbmlgg_all_clean.csv.gz"),
               "--signatures", str(tcga_dir / "signatures.csv")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "569 patients" in out and "35 sites" in out


def test_bad_synth_option(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--sites", "0"]) == 2
    assert "--sites must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["umeml", "umeml-server", "umeml-client"])
def test_console_scripts_have_help(script):
    exe = shutil.which(script) or str((__import__("pathlib").Path(sys.executable).parent / script))
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout

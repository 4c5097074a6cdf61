"""The ClientApp path imports no heavy library it does not use: a site process that only answers
a handshake or trains must not pay for pandas, scipy.stats or lifelines at import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from umeml.lazy import lazy_module

HEAVY = ("pandas", "scipy.stats", "lifelines")


def _imported_after(*stages: str) -> list[dict[str, bool]]:
    """Which of HEAVY are imported after each of ``stages`` (statements run one after the other in
    one fresh interpreter: one process start, each snapshot taken where its stage ends)."""
    snapshot = f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    code = "import json, sys\n" + "".join(f"{stage}\n{snapshot}\n" for stage in stages)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(stages):]]


@pytest.fixture(scope="module")
def after_app_then_use(tmp_path_factory) -> list[dict[str, bool]]:
    """HEAVY's import state after importing the client app, then after using the metrics and
    reading a table (both in one subprocess: the second stage starts where the first ended)."""
    sig = tmp_path_factory.mktemp("lazy") / "sig.csv"
    sig.write_text("g1,g2\nTP53,EGFR\n")
    return _imported_after(
        "import umeml.client.app",
        "from umeml.metrics.survival import concordance_index\n"
        "from umeml.metrics.classification import binary_auc\n"
        "from umeml.data.genomics import read_signatures\n"
        "concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [3.0, 2.0, 1.0])\n"
        "binary_auc([True, False], [0.9, 0.1])\n"
        f"read_signatures({str(sig)!r})")


def test_importing_the_client_app_imports_no_heavy_library(after_app_then_use):
    assert after_app_then_use[0] == {m: False for m in HEAVY}


def test_the_libraries_are_imported_where_used(after_app_then_use):
    # the check is not vacuous: using the metrics and reading a table does import them
    assert after_app_then_use[1] == {m: True for m in HEAVY}


def test_lazy_module_imports_on_first_attribute():
    mod = lazy_module("json")
    assert "not imported" in repr(mod)
    assert mod.dumps([1]) == "[1]"
    assert "imported" in repr(mod) and "not" not in repr(mod)

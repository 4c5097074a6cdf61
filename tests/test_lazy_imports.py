"""The ClientApp path imports no heavy library it does not use: a site process that only answers
a handshake or trains must not pay for pandas, scipy.stats or lifelines at import."""

from __future__ import annotations

import json
import subprocess
import sys

from umeml.lazy import lazy_module

HEAVY = ("pandas", "scipy.stats", "lifelines")


def _imported_after(statement: str) -> dict[str, bool]:
    code = f"import json, sys\n{statement}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_client_app_imports_no_heavy_library():
    assert _imported_after("import umeml.client.app") == {m: False for m in HEAVY}


def test_the_libraries_are_imported_where_used(tmp_path):
    # the check is not vacuous: using the metrics and reading a table does import them
    (tmp_path / "sig.csv").write_text("g1,g2\nTP53,EGFR\n")
    loaded = _imported_after(
        "import umeml.client.app\n"
        "from umeml.metrics.survival import concordance_index\n"
        "from umeml.metrics.classification import binary_auc\n"
        "from umeml.data.genomics import read_signatures\n"
        "concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [3.0, 2.0, 1.0])\n"
        "binary_auc([True, False], [0.9, 0.1])\n"
        f"read_signatures({str(tmp_path / 'sig.csv')!r})\n")
    assert loaded == {m: True for m in HEAVY}


def test_lazy_module_imports_on_first_attribute():
    mod = lazy_module("json")
    assert "not imported" in repr(mod)
    assert mod.dumps([1]) == "[1]"
    assert "imported" in repr(mod) and "not" not in repr(mod)

"""The core library never imports flwr: only umeml.server and umeml.client (the adapters) do."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "umeml"


def test_core_never_imports_flwr():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(CORE.parent)}: {n}" for n in names if n.split(".")[0] == "flwr"]
    assert not offenders, offenders

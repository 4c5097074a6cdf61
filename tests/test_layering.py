"""The package layering, checked on every import statement (module level or inside a function):

- the core library ``umeml/`` never imports flwr, nor any of the adapter packages;
- ``umeml.flower`` (the Flower adapter both sides share) imports neither ``umeml.server`` nor
  ``umeml.client``;
- ``umeml.server`` (coordinator) never imports ``umeml.client`` (sites), nor the reverse;
- ``umeml.simulation``, the one package that wires both sides, is reached from ``umeml.server``
  only by ``umeml-server``'s command line, inside a function, so that importing any server module
  never loads the sites' code (checked in a fresh interpreter too).

Every check first asserts that it saw files and imports, so that a broken scanner cannot pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"umeml": ROOT / "umeml", "umeml.server": ROOT / "server", "umeml.client": ROOT / "client",
            "umeml.flower": ROOT / "flower", "umeml.simulation": ROOT / "simulation"}
ADAPTERS = ("umeml.server", "umeml.client", "umeml.flower", "umeml.simulation")


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imports(package: str) -> list[tuple[str, str, bool]]:
    """(file, imported module, at module level) for every import in ``package``'s folder;
    relative imports are resolved to absolute names."""
    found = []
    files = sorted(p for p in PACKAGES[package].rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python file under {PACKAGES[package]}"
    for path in files:
        tree = ast.parse(path.read_text())
        module = _module_name(package, path)
        is_pkg = path.name == "__init__.py"
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    names = [".".join(base + ([node.module] if node.module else []))]
                elif node.module:
                    names = [node.module]
            found += [(str(path.relative_to(ROOT)), n, id(node) in top_level) for n in names]
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    imports = _imports(package)
    assert len(imports) > 10, f"only {len(imports)} imports parsed under {package}: the check would be vacuous"
    return [f"{f}: {n}" for f, n, _ in imports if any(n == b or n.startswith(b + ".") for b in forbidden)]


def test_the_scanner_sees_imports_at_every_depth():
    """Known imports are found (module level, inside functions, relative), so the checks below
    can fail."""
    server = _imports("umeml.server")
    assert ("server/coordinator.py", "flwr.app", True) in server
    assert any(f == "server/cli.py" and n == "umeml.server.certs" and not top for f, n, top in server)
    client = _imports("umeml.client")
    assert ("client/extract/pipeline.py", "umeml.client.extract.encoders", True) in client  # `from .encoders`
    assert ("client/app.py", "umeml.flower.records", True) in client


def test_core_never_imports_flwr_nor_an_adapter():
    offenders = _offenders("umeml", ("flwr", *ADAPTERS))
    assert not offenders, offenders


def test_flower_adapter_imports_neither_side():
    offenders = _offenders("umeml.flower", ("umeml.server", "umeml.client", "umeml.simulation"))
    assert not offenders, offenders


def test_server_never_imports_client():
    offenders = _offenders("umeml.server", ("umeml.client",))
    assert not offenders, offenders


def test_client_never_imports_server():
    offenders = _offenders("umeml.client", ("umeml.server", "umeml.simulation"))
    assert not offenders, offenders


def test_only_the_server_command_line_reaches_the_simulation_lazily():
    uses = [(f, n, top) for f, n, top in _imports("umeml.server") if n.startswith("umeml.simulation")]
    assert uses, "server/cli.py's simulate command no longer calls umeml.simulation: update this test"
    assert all(f == "server/cli.py" and not top for f, n, top in uses), uses
    wired = {n for _, n, _ in _imports("umeml.simulation")}
    assert {"umeml.server.app", "umeml.client.app"} <= wired


def _loaded_after_import(modules: list[str]) -> list[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('umeml.'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return res.stdout.split()


def test_importing_one_side_never_loads_the_other():
    server = [_module_name("umeml.server", p) for p in sorted((ROOT / "server").glob("*.py"))]
    flower = [_module_name("umeml.flower", p) for p in sorted((ROOT / "flower").glob("*.py"))]
    loaded = _loaded_after_import(server + flower)
    assert "umeml.server.coordinator" in loaded and "umeml.flower.records" in loaded
    assert not [m for m in loaded if m.startswith(("umeml.client", "umeml.simulation"))], loaded
    loaded = _loaded_after_import(["umeml.client.app", "umeml.client.site_cli", "umeml.client.cli"])
    assert "umeml.client.app" in loaded and "umeml.flower.records" in loaded
    assert not [m for m in loaded if m.startswith(("umeml.server", "umeml.simulation"))], loaded

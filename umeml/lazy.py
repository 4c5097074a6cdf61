"""A module imported on first attribute access, for heavy libraries that only some paths use.

A site's ClientApp process imports umeml's data and metrics modules, but pandas (cohort tables),
scipy.stats and lifelines (metrics) cost a second of CPU at import; with ``lazy_module`` the
import happens where the library is first used, not when the module that names it is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name`` and imports it when an attribute is first read."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy/pickle/inspection probes must not trigger the import
            raise AttributeError(attr)
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r} ({'imported' if self._module is not None else 'not imported yet'})>"


def lazy_module(name: str) -> LazyModule:
    """``pd = lazy_module("pandas")``: the module ``name``, imported when first used."""
    return LazyModule(name)


# what the first round of a run would otherwise import mid-round: metrics (scipy.stats, lifelines),
# the privacy accountants (opacus, which also pulls in torch._dynamo)
FIRST_USE = ("scipy.stats", "lifelines.utils", "opacus.accountants")


def import_now(names: tuple[str, ...] = FIRST_USE) -> list[str]:
    """Import ``names`` now (a long-lived process warming up, so that no message pays for them);
    returns those that are not installed."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing

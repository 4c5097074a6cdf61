"""Where a cohort lives: a data directory, or a table with its signatures and feature bags.

Every entry point names its cohort with one :class:`CohortSource` (command-line arguments, a
site file, a Flower run config, a simulation's saved settings) and loads it with
:meth:`CohortSource.load`, so the choice between a data directory and the files one by one, and
the rules about which combinations make sense, live here only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from umeml.errors import ConfigError, MissingPathError

if TYPE_CHECKING:  # umeml.config imports this module: no runtime import back
    from umeml.config import DataConfig
    from umeml.data.cohort import Cohort

# how each field is spelled on the command line and in a Flower run config (``sim-data-dir``)
ARG_NAMES = {"data_dir": "--data", "table": "--table", "signatures": "--signatures", "bags": "--bags"}
_ARG_ATTRS = {"data_dir": "data", "table": "table", "signatures": "signatures", "bags": "bags"}
# what each path must be, and its name in messages
_PATH_KINDS = {"data_dir": ("folder", "data directory"), "table": ("file", "cohort table"),
               "signatures": ("file", "signatures file"), "bags": ("folder", "feature bag folder")}
_SETTING_KEYS = {"data_dir": "data-dir", "table": "table", "signatures": "signatures", "bags": "bags"}


def source_problem(values: Mapping[str, object], names: Mapping[str, str] | None = None) -> str | None:
    """Why ``values`` (data_dir, table, signatures, bags; None = not given) cannot name a cohort,
    in the caller's spelling of the fields (``names``); None when they can."""
    names = names or {k: k for k in ARG_NAMES}
    if (values.get("data_dir") is None) == (values.get("table") is None):
        return f"{names['data_dir']} / {names['table']}: give exactly one of them"
    extra = [names[k] for k in ("signatures", "bags") if values.get(k) is not None]
    if values.get("data_dir") is not None and extra:
        return (f"{' / '.join(extra)}: only with {names['table']} (a data directory holds its own "
                "signatures.csv and bags/)")
    return None


@dataclass(frozen=True)
class CohortSource:
    """A data directory as ``umeml synth`` writes it (table.csv, signatures.csv, bags/), or a
    table with optional signatures and bags (genomics only without bags). Paths are strings."""

    data_dir: str | None = None
    table: str | None = None
    signatures: str | None = None
    bags: str | None = None

    def __post_init__(self) -> None:
        problem = source_problem(asdict(self))
        if problem:
            raise ConfigError(f"cohort source: {problem}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CohortSource":
        """From ``--data`` or ``--table`` / ``--signatures`` / ``--bags`` (ConfigError naming the
        options when they do not name one cohort)."""
        values = {k: getattr(args, attr, None) for k, attr in _ARG_ATTRS.items()}
        values = {k: None if v is None else str(v) for k, v in values.items()}
        problem = source_problem(values, ARG_NAMES)
        if problem:
            raise ConfigError(problem)
        return cls(**values)

    @classmethod
    def from_settings(cls, settings: Mapping, prefix: str = "sim-") -> "CohortSource | None":
        """Read back what :meth:`settings` wrote (None when it names no cohort)."""
        values = {k: str(settings.get(prefix + key, "")) or None for k, key in _SETTING_KEYS.items()}
        if values["data_dir"] is None and values["table"] is None:
            return None
        return cls(**values)

    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "cohort source") -> "CohortSource":
        """Read back what :meth:`to_dict` wrote (e.g. a simulation's ``simulation.json``)."""
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ARG_NAMES)}")
        problem = source_problem(raw)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        return cls(**{k: None if v is None else str(v) for k, v in raw.items()})

    def to_dict(self) -> dict[str, str | None]:
        """Plain JSON form (None for a field not given)."""
        return asdict(self)

    def settings(self, prefix: str = "sim-") -> dict[str, str]:
        """Flat string settings for a Flower run config or node config (``""`` for a field not given)."""
        return {prefix + key: getattr(self, k) or "" for k, key in _SETTING_KEYS.items()}

    def resolved(self) -> "CohortSource":
        """The same source with absolute paths (for processes started in another folder)."""
        return CohortSource(**{k: None if v is None else str(Path(v).resolve()) for k, v in asdict(self).items()})

    def check_paths(self, names: Mapping[str, str] | None = None, data_cfg: "DataConfig | None" = None) -> None:
        """Every path given exists and is of its kind (and ``data_cfg.site_map``, when set); else
        one :class:`~umeml.errors.MissingPathError` naming each bad path in the caller's spelling
        of the field (``names``, default the command-line flags), so all are fixed in one pass."""
        names = names or ARG_NAMES
        found = []
        site_map = getattr(data_cfg, "site_map", None)
        if site_map is not None and not Path(site_map).is_file():
            found.append(f"data.site_map {site_map}: site map {'is a directory' if Path(site_map).is_dir() else 'not found'}")
        for key, (kind, what) in _PATH_KINDS.items():
            value = getattr(self, key)
            if value is None:
                continue
            path = Path(value)
            if not path.exists():
                found.append(f"{names[key]} {value}: {what} not found")
            elif kind == "folder" and not path.is_dir():
                found.append(f"{names[key]} {value}: is a file, not a {what}")
            elif kind == "file" and path.is_dir():
                found.append(f"{names[key]} {value}: is a directory, not a {what}")
        if found:
            raise MissingPathError("; ".join(found))

    def load(self, data_cfg: "DataConfig | None" = None, *, scan_features: bool = False,
             names: Mapping[str, str] | None = None) -> "Cohort":
        """Read and validate the cohort with the data settings ``data_cfg`` (the experiment's
        ``data`` section; defaults when None); ``scan_features``: also read every bag's features
        to find NaN/Inf values (a full pass over the bags, chunked).

        Raises :class:`~umeml.errors.MissingPathError` (also a FileNotFoundError) naming each
        missing path in the spelling ``names`` (:meth:`check_paths`), and
        :class:`~umeml.errors.DataValidationError` listing every problem of the data itself.
        """
        from umeml.data.cohort import load_cohort, load_data_dir

        self.check_paths(names, data_cfg)
        if self.data_dir is not None:
            return load_data_dir(self.data_dir, data_cfg, scan_features=scan_features)
        return load_cohort(self.table, self.signatures, self.bags, data_cfg, scan_features=scan_features)

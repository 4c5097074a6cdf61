"""Site identity: an explicit ``site`` column, else the TCGA tissue-source-site code of the barcode."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from umeml.errors import Problem
from umeml.rundir import name_problem

TCGA_BARCODE = re.compile(r"^TCGA-([A-Z0-9]{2})-[A-Z0-9]{4}")


def tss_code(case_id: str) -> str | None:
    """The tissue-source-site code of a TCGA barcode (``TCGA-HT-7603`` -> ``HT``), else None."""
    match = TCGA_BARCODE.match(case_id)
    return match.group(1) if match else None


def normalise_site(value: str) -> str:
    """Undo spreadsheet damage to TSS codes: a purely numeric code lost its leading zero ('6' -> '06')."""
    value = value.strip()
    if value.isdigit() and len(value) < 2:
        return value.zfill(2)
    return value


def load_site_map(path: str | Path) -> dict[str, str]:
    """Read a site map CSV with columns ``code`` and ``institution`` (merges codes into institutions)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except OSError as err:
        raise ValueError(f"{path}: cannot read site map ({err.strerror})") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read site map ({err})") from err
    missing = {"code", "institution"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: site map needs columns code, institution; missing {sorted(missing)}")
    mapping: dict[str, str] = {}
    for row, (code, inst) in enumerate(zip(table["code"], table["institution"]), start=2):
        code, inst = normalise_site(code), inst.strip()
        if not code or not inst:
            raise ValueError(f"{path}: line {row}: code and institution must both be non-empty")
        if code in mapping and mapping[code] != inst:
            raise ValueError(f"{path}: line {row}: code {code!r} mapped to both {mapping[code]!r} and {inst!r}")
        mapping[code] = inst
    return mapping


def resolve_sites(
    table: pd.DataFrame, source: str, site_map: dict[str, str] | None = None
) -> tuple[pd.Series, list[Problem]]:
    """Site of every row: the ``site`` column when present and filled, else the barcode's TSS code.

    Returns the site series and the problems found (rows with no resolvable site).
    """
    problems: list[Problem] = []
    explicit = table["site"] if "site" in table.columns else pd.Series([""] * len(table), index=table.index)
    sites = []
    for idx, (case_id, value) in enumerate(zip(table["case_id"], explicit)):
        value = "" if pd.isna(value) else normalise_site(str(value))
        site = value or tss_code(str(case_id)) or ""
        if not site:
            problems.append(
                Problem(source, f"row {idx + 2}", f"case_id {case_id!r}: no 'site' value and not a TCGA barcode")
            )
        elif site_map is not None:
            site = site_map.get(site, site)
        if site and name_problem(site):  # a site names its folders (sites/<site>/ in a simulation)
            problems.append(Problem(source, f"row {idx + 2}", f"site {site!r} {name_problem(site)}"))
        sites.append(site)
    return pd.Series(sites, index=table.index, dtype=object), problems

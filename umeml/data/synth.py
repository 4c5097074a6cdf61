"""Synthetic TCGA-like multimodal glioma cohort: a pure function of its seed.

Generative story (the latent variables are what ``oracle.json`` is computed from):
- sites have label shift (their own subtype proportions) and a stain shift (an affine change
  of every patch feature, the batch effect pathology models must survive);
- each of six subtypes (ASTR, OAST, ODG, AASTR, AOAST, GBM -> WHO II/III/IV) has a mixture
  over tissue "morphotypes"; a patient's mixture is drawn around it, and every patch is a
  noisy copy of the centroid of a morphotype drawn from that mixture;
- genomics: six gene groups, a few genes per group carry subtype-dependent means, a few load
  on a latent aggressiveness ``z``;
- survival: exponential with a grade-dependent base hazard times exp(0.6 z), independent
  uniform censoring on (1, 100) months.
Bag sizes vary over two orders of magnitude; a few patients miss one modality; some have two
slides. Bags are streamed to disk slide by slide, never held together in memory.

``clustered=True`` (off by default; the default cohort is unchanged, byte for byte) lays the
patches of a slide out in space (``coords``) as real tissue is: morphotypes come in spatially
contiguous regions. Three variants (``clustered_variant``):

- ``"mosaic"`` (the first one; its cohorts keep their bytes): a slide is a mosaic of spatial
  regions (about ``REGION_PATCHES`` patches each, every grid cell joins its nearest region seed in
  ``coords``), each region holding one morphotype and sharing a small regional offset. Only a
  fraction of the regions (the tumour, 5-40% of the slide, drawn per patient) take their
  morphotype from the subtype's mixture; the rest is background tissue
  (``BACKGROUND_MORPHOTYPES`` extra centroids, a patient-specific mixture common to all subtypes).
  Measured: UMEML and mean pooling tie on it (the masked mean still estimates the tumour mixture).
- ``"foci"``: a biopsy with little tumour, where the label lives in a few patches. The background
  is the same regional mosaic of background morphotypes; the tumour is 2-10% of the patches
  (``FOCI_TUMOUR_FRACTION``, drawn per patient) in 1-3 compact foci (the cells nearest to focus
  centres drawn on the grid), each focus with its own regional offset, its patches' morphotypes
  drawn i.i.d. from the patient's subtype mixture (tumour is heterogeneous at patch scale). In
  grade IV (GBM) patients the centre of every focus is necrosis (``NECROSIS_CORE`` of a focus's
  cells, one extra "necrosis" centroid, never seen elsewhere), in ``NECROSIS_SHOWN`` of them (a
  biopsy can miss the necrotic core): the WHO grade IV hallmark, rare (about 1% of the patches),
  label-defining and co-located with the tumour. A bag's mean then carries the tumour signal at
  a few percent of its size, under a background mixture that varies from patient to patient (the
  low witness rate of multiple-instance learning), which pooling that selects patches (prototype
  cross-attention) need not dilute. ``oracle.json`` also sees whether necrosis was shown.
  Measured: a tie as well; linear probes show that the mean of an ideal (one-hot) patch embedding
  loses about 0.01 AUC to pooling the tumour patches alone (docs/benchmarks.md).
- ``"arrangement"``: the grade lives in *where* the tumour is, not in how much or which. The
  background is the foci mosaic; the tumour is 20-50% of the patches
  (``ARRANGEMENT_TUMOUR_FRACTION``, per patient), its morphotypes drawn i.i.d. from ONE pan-glioma
  mixture shared by all subtypes (the mean of the subtype mixtures, jittered per patient as
  elsewhere), so the bag's morphotype shares carry neither subtype nor grade. The layout carries
  the grade: II infiltrative (tumour patches scattered uniformly among the background), III the
  same share in 1-3 compact masses, IV compact masses whose core is necrosis (3-8% of the patches,
  ``ARRANGEMENT_NECROSIS``, always shown), rimmed by tumour. Necrosis makes IV visible to a mean
  as well; II vs III is layout only, which a coordinate-blind model cannot see. Genomics: the gene
  means (and the mutation rate) depend on the histological lineage only (astrocytic ASTR/AASTR/GBM,
  oligoastrocytic OAST/AOAST, oligodendroglial ODG), not on the grade, so genomics give the
  lineage, the layout gives the grade, and the subtype (lineage x grade) needs both. Survival keeps
  its grade-dependent hazard. ``oracle.json`` also sees the layout (one-hot) and necrosis.

``tumour_fraction`` overrides the variant's range (mosaic: share of the regions; foci and
arrangement: share of the patches). Only ``model.spatial_context`` reads ``coords``; otherwise locality reaches the
model as the features' shared regional and focal offsets, as real patch encoders see neighbouring
tissue alike.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from umeml.config import DEFAULT_GRADE_MAP
from umeml.data.bags import BagWriter, bag_path
from umeml.rundir import atomic_write

SUBTYPES = ("ASTR", "OAST", "ODG", "AASTR", "AOAST", "GBM")
BASE_PROPORTIONS = np.array([0.10, 0.20, 0.18, 0.16, 0.15, 0.21])
GROUP_NAMES = (
    "Tumor Suppressor Genes",
    "Oncogenes",
    "Protein Kinases",
    "Cell Differentiation Markers",
    "Transcription Factors",
    "Cytokines and Growth Factors",
)
BASE_HAZARD = {"II": 0.006, "III": 0.015, "IV": 0.05}  # deaths per month
WRITE_CHUNK = 2048  # patches generated and written at a time
# the clustered option (SynthSpec.clustered)
PATCH_SIZE = 256  # pixels: the grid step of every synthetic bag's coords
REGION_PATCHES = 40  # patches per spatial region, on average
BACKGROUND_MORPHOTYPES = 4
TUMOUR_FRACTION = (0.05, 0.4)  # of a slide's regions, uniform per patient
CLUSTERED_VARIANTS = ("mosaic", "foci", "arrangement")
LATER_OPTIONS = ("clustered", "clustered_variant", "tumour_fraction")  # in synth.json only when set
FOCI_TUMOUR_FRACTION = (0.02, 0.10)  # of a slide's patches, uniform per patient ("foci")
FOCI_PER_SLIDE = (1, 3)  # tumour foci per slide, uniform
NECROSIS_CORE = 0.3  # share of a grade IV focus's cells (those nearest its centre) that are necrosis
NECROSIS_SHOWN = 0.8  # share of grade IV patients whose slides show the necrotic core
ARRANGEMENT_TUMOUR_FRACTION = (0.2, 0.5)  # of a slide's patches, uniform per patient ("arrangement")
ARRANGEMENT_NECROSIS = (0.03, 0.08)  # of a grade IV slide's patches, uniform per patient ("arrangement")
MASSES_PER_SLIDE = (1, 3)  # tumour masses (III/IV) or infiltration groups (II) per slide ("arrangement")
LINEAGE = (0, 1, 2, 0, 1, 0)  # per subtype: its lineage's low-grade subtype (astrocytic, oligoastrocytic, ODG)


@dataclass(frozen=True)
class SynthSpec:
    """Size and difficulty knobs of a synthetic cohort (``patients`` is per site)."""

    sites: int = 4
    patients: int = 60
    seed: int = 0
    feature_dim: int = 64
    median_patches: int = 300
    min_patches: int = 16
    max_patches: int = 2000
    genes_per_group: int = 12
    morphotypes: int = 8
    missing_fraction: float = 0.03
    two_slide_fraction: float = 0.2
    stain_shift: float = 0.4
    dtype: str = "float16"
    clustered: bool = False  # spatially clustered morphotypes in a tumour/background mosaic
    clustered_variant: str = "mosaic"  # with clustered: "mosaic", "foci" or "arrangement" (module docstring)
    tumour_fraction: tuple[float, float] | None = None  # with clustered: the variant's range if None

    def check(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        rules = [
            (self.sites >= 1, "--sites must be >= 1"),
            (self.sites <= 36 * 36, "--sites must be <= 1296"),
            (self.patients >= 1, "--patients must be >= 1"),
            (self.patients <= 9999, "--patients must be <= 9999 per site"),
            (self.feature_dim >= 2, "--feature-dim must be >= 2"),
            (1 <= self.min_patches <= self.median_patches <= self.max_patches,
             "need 1 <= --min-patches <= --median-patches <= --max-patches"),
            (self.genes_per_group >= 4, "--genes-per-group must be >= 4"),
            (0 <= self.missing_fraction < 0.5, "--missing-fraction must be in [0, 0.5)"),
            (self.dtype in ("float16", "float32"), "dtype must be float16 or float32"),
            (self.clustered_variant in CLUSTERED_VARIANTS,
             f"--clustered must be one of {', '.join(CLUSTERED_VARIANTS)}"),
            (self.clustered or (self.clustered_variant == "mosaic" and self.tumour_fraction is None),
             "clustered_variant and tumour_fraction (--clustered VARIANT, --tumour-fraction) need clustered=True (--clustered)"),
            (self.tumour_fraction is None or (len(self.tumour_fraction) == 2
                                              and 0 < self.tumour_fraction[0] <= self.tumour_fraction[1] <= 1),
             "--tumour-fraction must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)


def site_codes(n: int) -> list[str]:
    """Two-character TSS-like codes, deterministic: A0, A1, ..., A9, B0, ..."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return [f"{alphabet[i // 10 % 36]}{i % 10}" if n <= 360 else f"{alphabet[i // 36]}{alphabet[i % 36]}" for i in range(n)]


@dataclass
class _World:
    """Global latent parameters shared by all patients."""

    centroids: np.ndarray  # (Q, D)
    subtype_mix: np.ndarray  # (6, Q)
    site_props: np.ndarray  # (S, 6)
    site_offset: np.ndarray  # (S, D)
    site_scale: np.ndarray  # (S,)
    gene_effects: np.ndarray  # (6, G): subtype means of every gene (zero for most)
    z_loading: np.ndarray  # (G,)
    genes: list[str]
    gene_groups: list[list[str]]
    background: np.ndarray | None = None  # (Qb, D) background centroids (clustered only)
    necrosis: np.ndarray | None = None  # (1, D) the necrosis centroid (clustered "foci", "arrangement")
    pan_mix: np.ndarray | None = None  # (Q,) the pan-glioma tumour mixture (clustered "arrangement" only)


def _world(spec: SynthSpec, rng: np.random.Generator) -> _World:
    q, d = spec.morphotypes, spec.feature_dim
    centroids = rng.normal(0, 1.0, (q, d)) * np.sqrt(8.0 / d)
    subtype_mix = rng.dirichlet(np.full(q, 0.6), size=len(SUBTYPES))
    site_props = rng.dirichlet(BASE_PROPORTIONS * 15, size=spec.sites)
    site_offset = rng.normal(0, spec.stain_shift, (spec.sites, d)) * np.sqrt(8.0 / d)
    site_scale = 1.0 + rng.normal(0, spec.stain_shift / 4, spec.sites)
    groups, genes = [], []
    for g, _name in enumerate(GROUP_NAMES):
        members = [f"SG{g + 1}X{j + 1}" for j in range(spec.genes_per_group)]
        groups.append(members)
        genes.extend(members)
    n_genes = len(genes)
    effects = np.zeros((len(SUBTYPES), n_genes))
    loading = np.zeros(n_genes)
    for g in range(len(GROUP_NAMES)):
        base = g * spec.genes_per_group
        informative = base + np.arange(2)
        effects[:, informative] = rng.normal(0, 0.9, (len(SUBTYPES), 2))
        loading[base + 2] = rng.choice([-0.8, 0.8])
    background = None
    if spec.clustered:  # from its own stream, so the shared world is the default one
        brng = np.random.default_rng([spec.seed, 1])
        background = brng.normal(0, 1.0, (BACKGROUND_MORPHOTYPES, d)) * np.sqrt(8.0 / d)
    necrosis = None
    if spec.clustered and spec.clustered_variant in ("foci", "arrangement"):  # a third stream: mosaic keeps its bytes
        necrosis = np.random.default_rng([spec.seed, 2]).normal(0, 1.0, (1, d)) * np.sqrt(8.0 / d)
    pan_mix = None
    if spec.clustered and spec.clustered_variant == "arrangement":
        # after every draw, so the other variants' worlds are untouched: one tumour mixture for all
        # subtypes (the shares carry no label) and gene means per lineage (genomics carry no grade)
        pan_mix = subtype_mix.mean(axis=0)
        effects = effects[list(LINEAGE)]
    return _World(centroids, subtype_mix, site_props, site_offset, site_scale, effects, loading, genes, groups,
                  background, necrosis, pan_mix)


def _genomic_columns(world: _World) -> list[str]:
    cols = [f"{g}_rnaseq" for g in world.genes]
    for members in world.gene_groups:
        cols += [f"{g}_cnv" for g in members[:2]]
    cols.append(f"{world.gene_groups[0][0]}_mut")
    return cols


def _genomic_row(world: _World, subtype: int, z: float, rng: np.random.Generator) -> dict[str, float]:
    expr = world.gene_effects[subtype] + world.z_loading * z + rng.normal(0, 1.0, len(world.genes))
    row = {f"{g}_rnaseq": float(v) for g, v in zip(world.genes, expr)}
    for members in world.gene_groups:
        for g in members[:2]:
            idx = world.genes.index(g)
            row[f"{g}_cnv"] = float(np.clip(np.round(expr[idx] / 1.5), -2, 2))
    first = world.gene_groups[0][0]
    # "arrangement" worlds (pan_mix set) make the mutation rate a lineage's (astrocytic), like the gene means
    frequent = LINEAGE[subtype] == 0 if world.pan_mix is not None else SUBTYPES[subtype] in ("GBM", "AASTR")
    row[f"{first}_mut"] = float(rng.random() < (0.6 if frequent else 0.15))
    return row


def _write_slide(path: Path, n: int, mix: np.ndarray, world: _World, site: int, spec: SynthSpec,
                 rng: np.random.Generator) -> None:
    attrs = {"encoder": "synthetic", "patch_size": PATCH_SIZE, "mpp": 0.5, "magnification": 20.0, "level": 0}
    side = int(np.ceil(np.sqrt(n)))

    def write(tmp: Path) -> None:
        with BagWriter(tmp, spec.feature_dim, attrs=attrs, dtype=spec.dtype) as writer:
            for start in range(0, n, WRITE_CHUNK):
                m = min(WRITE_CHUNK, n - start)
                kinds = rng.choice(len(mix), size=m, p=mix)
                feats = world.centroids[kinds] + rng.normal(0, 0.35, (m, spec.feature_dim)) * np.sqrt(8.0 / spec.feature_dim)
                feats = feats * world.site_scale[site] + world.site_offset[site]
                pos = np.arange(start, start + m)
                coords = np.stack([(pos % side) * PATCH_SIZE, (pos // side) * PATCH_SIZE], axis=1)
                writer.append(feats.astype(spec.dtype), coords)

    atomic_write(path, write)


def _mosaic_mixture(world: _World, mix: np.ndarray, rng: np.random.Generator,
                    tumour_fraction: tuple[float, float] | None = None) -> np.ndarray:
    """A patient's region mixture over ``[centroids; background]`` (clustered option): the
    tumour fraction f of the regions follows the subtype mixture ``mix``, the rest a background
    mixture of this patient's own."""
    frac = rng.uniform(*(tumour_fraction or TUMOUR_FRACTION))
    background = rng.dirichlet(np.full(len(world.background), 1.0))
    return np.concatenate([frac * mix, (1.0 - frac) * background])


def mosaic_kinds(n: int, mixture: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Morphotype and region of each of ``n`` grid patches, and their (x, y) grid cells.

    Region seeds are uniform over the ``side x side`` grid (row-major positions, as the default
    slides); every cell joins its nearest seed and takes that region's morphotype.
    """
    side = int(np.ceil(np.sqrt(n)))
    n_regions = max(2, int(round(n / REGION_PATCHES)))
    seeds = rng.uniform(0, side, (n_regions, 2))
    region_kind = rng.choice(len(mixture), size=n_regions, p=mixture / mixture.sum())
    pos = np.arange(n)
    cells = np.stack([pos % side, pos // side], axis=1)
    region = np.empty(n, dtype=np.int64)
    for start in range(0, n, WRITE_CHUNK):  # nearest seed, chunked: memory O(chunk x regions)
        part = cells[start:start + WRITE_CHUNK] + 0.5
        region[start:start + len(part)] = ((part[:, None, :] - seeds[None]) ** 2).sum(-1).argmin(1)
    return region_kind[region], region, cells


def foci_kinds(n: int, tumour: float, mix: np.ndarray, background: np.ndarray, necrotic: bool,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Morphotype and region of each of ``n`` grid patches, and their (x, y) grid cells, for the
    clustered "foci" variant.

    Kinds index ``[tumour morphotypes (len(mix)); background (len(background)); necrosis]``. The
    background is a mosaic (:func:`mosaic_kinds`); then the ``max(1, round(tumour * n))`` cells
    nearest to 1-3 focus centres (grid cells) become tumour, one region per focus, each patch's
    morphotype drawn from ``mix``; with ``necrotic`` the ``NECROSIS_CORE`` of each focus's cells
    nearest its centre become necrosis.
    """
    q = len(mix)
    kinds, region, cells = mosaic_kinds(n, background, rng)
    kinds = kinds + q
    n_tumour = max(1, int(round(tumour * n)))
    n_foci = min(int(rng.integers(FOCI_PER_SLIDE[0], FOCI_PER_SLIDE[1] + 1)), n_tumour)
    centres = cells[rng.choice(n, size=n_foci, replace=False)] + 0.5
    dist = np.sqrt(((cells[:, None, :] + 0.5 - centres[None]) ** 2).sum(-1))  # (n, foci): n x 3 at most
    focus, near = dist.argmin(1), dist.min(1)
    tumour_cells = np.argsort(near, kind="stable")[:n_tumour]  # nearest first: compact foci
    kinds[tumour_cells] = rng.choice(q, size=n_tumour, p=mix / mix.sum())
    region[tumour_cells] = int(region.max()) + 1 + focus[tumour_cells]
    if necrotic:
        for f in range(n_foci):
            members = tumour_cells[focus[tumour_cells] == f]  # in order of distance to centre f
            kinds[members[:int(round(NECROSIS_CORE * len(members)))]] = q + len(background)
    return kinds, region, cells


def arrangement_kinds(n: int, tumour: float, grade: str, necrosis: float, mix: np.ndarray, background: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Morphotype and region of each of ``n`` grid patches, and their (x, y) grid cells, for the
    clustered "arrangement" variant (kinds indexed as in :func:`foci_kinds`).

    The background is a mosaic; ``max(1, round(tumour * n))`` cells become tumour, morphotypes
    drawn from ``mix``, in 1-3 groups (one region offset each, for every grade alike). Grade II:
    the cells are scattered uniformly over the slide (infiltration), each joining a random group.
    III and IV: the cells nearest to the group centres (compact masses); in IV the masses first
    take ``round(necrosis * n)`` more cells, their cores (nearest a centre), which are necrosis.
    """
    q = len(mix)
    kinds, region, cells = mosaic_kinds(n, background, rng)
    kinds = kinds + q
    n_tumour = max(1, int(round(tumour * n)))
    n_necrosis = min(int(round(necrosis * n)), n - n_tumour) if grade == "IV" else 0
    n_masses = min(int(rng.integers(MASSES_PER_SLIDE[0], MASSES_PER_SLIDE[1] + 1)), n_tumour)
    centres = cells[rng.choice(n, size=n_masses, replace=False)] + 0.5
    tumour_kinds = rng.choice(q, size=n_tumour, p=mix / mix.sum())  # drawn alike for every grade
    first = int(region.max()) + 1
    if grade == "II":
        chosen = rng.choice(n, size=n_tumour, replace=False)
        kinds[chosen] = tumour_kinds
        region[chosen] = first + rng.integers(0, n_masses, size=n_tumour)
        return kinds, region, cells
    dist = np.sqrt(((cells[:, None, :] + 0.5 - centres[None]) ** 2).sum(-1))  # (n, masses): n x 3 at most
    mass, near = dist.argmin(1), dist.min(1)
    chosen = np.argsort(near, kind="stable")[:n_tumour + n_necrosis]  # nearest first: compact, core first
    region[chosen] = first + mass[chosen]
    kinds[chosen[:n_necrosis]] = q + len(background)
    kinds[chosen[n_necrosis:]] = tumour_kinds
    return kinds, region, cells


def _write_regions(path: Path, kinds: np.ndarray, region: np.ndarray, cells: np.ndarray, centroids: np.ndarray,
                   world: _World, site: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    """A clustered slide: every patch a noisy copy of its morphotype's centroid plus its region's
    shared offset (neighbouring tissue looks alike to a patch encoder), then the site's stain."""
    attrs = {"encoder": "synthetic", "patch_size": PATCH_SIZE, "mpp": 0.5, "magnification": 20.0, "level": 0}
    n = len(kinds)
    scale = np.sqrt(8.0 / spec.feature_dim)
    offsets = rng.normal(0, 0.15, (int(region.max()) + 1, spec.feature_dim)) * scale

    def write(tmp: Path) -> None:
        with BagWriter(tmp, spec.feature_dim, attrs=attrs, dtype=spec.dtype) as writer:
            for start in range(0, n, WRITE_CHUNK):
                sl = slice(start, min(start + WRITE_CHUNK, n))
                m = sl.stop - sl.start
                feats = centroids[kinds[sl]] + offsets[region[sl]] + rng.normal(0, 0.35, (m, spec.feature_dim)) * scale
                feats = feats * world.site_scale[site] + world.site_offset[site]
                writer.append(feats.astype(spec.dtype), cells[sl] * PATCH_SIZE)

    atomic_write(path, write)


@dataclass(frozen=True)
class _Foci:
    """A patient's draws for the clustered "foci" variant, shared by its slides."""

    tumour: float  # share of a slide's patches that are tumour
    background: np.ndarray  # mixture over the background morphotypes
    necrotic: bool  # grade IV and the biopsy shows the necrotic core


def _foci_draws(spec: SynthSpec, world: _World, grade: str, rng: np.random.Generator) -> _Foci:
    tumour = float(rng.uniform(*(spec.tumour_fraction or FOCI_TUMOUR_FRACTION)))
    background = rng.dirichlet(np.full(len(world.background), 1.0))
    shown = bool(rng.random() < NECROSIS_SHOWN)
    return _Foci(tumour, background, grade == "IV" and shown)


@dataclass(frozen=True)
class _Arrangement:
    """A patient's draws for the clustered "arrangement" variant, shared by its slides."""

    tumour: float  # share of a slide's patches that are tumour (necrosis not included)
    background: np.ndarray  # mixture over the background morphotypes
    necrosis: float  # share of a slide's patches that are necrosis if grade IV (drawn for every grade)


def _arrangement_draws(spec: SynthSpec, world: _World, rng: np.random.Generator) -> _Arrangement:
    tumour = float(rng.uniform(*(spec.tumour_fraction or ARRANGEMENT_TUMOUR_FRACTION)))
    background = rng.dirichlet(np.full(len(world.background), 1.0))
    return _Arrangement(tumour, background, float(rng.uniform(*ARRANGEMENT_NECROSIS)))


def _write_slides(spec: SynthSpec, world: _World, s: int, sizes: list[int], slide_ids: list[str], mix: np.ndarray,
                  grade: str, bag_dir: Path, rng: np.random.Generator) -> bool:
    """Write a patient's slides (default, mosaic, foci or arrangement); returns whether they show necrosis."""
    if not slide_ids:
        return False
    if not spec.clustered:
        for n, slide_id in zip(sizes, slide_ids):
            _write_slide(bag_path(bag_dir, slide_id), n, mix, world, s, spec, rng)
        return False
    if spec.clustered_variant == "mosaic":
        mixture = _mosaic_mixture(world, mix, rng, spec.tumour_fraction)
        centroids = np.concatenate([world.centroids, world.background])
        for n, slide_id in zip(sizes, slide_ids):
            kinds, region, cells = mosaic_kinds(n, mixture, rng)
            _write_regions(bag_path(bag_dir, slide_id), kinds, region, cells, centroids, world, s, spec, rng)
        return False
    centroids = np.concatenate([world.centroids, world.background, world.necrosis])
    if spec.clustered_variant == "arrangement":
        draws = _arrangement_draws(spec, world, rng)
        for n, slide_id in zip(sizes, slide_ids):
            kinds, region, cells = arrangement_kinds(n, draws.tumour, grade, draws.necrosis, mix, draws.background, rng)
            _write_regions(bag_path(bag_dir, slide_id), kinds, region, cells, centroids, world, s, spec, rng)
        return grade == "IV"
    foci = _foci_draws(spec, world, grade, rng)
    for n, slide_id in zip(sizes, slide_ids):
        kinds, region, cells = foci_kinds(n, foci.tumour, mix, foci.background, foci.necrotic, rng)
        _write_regions(bag_path(bag_dir, slide_id), kinds, region, cells, centroids, world, s, spec, rng)
    return foci.necrotic


def _patient(spec: SynthSpec, world: _World, s: int, code: str, j: int, gen_cols: list[str],
             bag_dir: Path) -> tuple[list[dict], dict]:
    """Patient ``j`` of site ``s``: its table rows (one per slide, or one without slides), with
    its bags written to ``bag_dir``, and its latent variables. Drawn from its own generator
    (seed, site, patient), so a patient does not depend on the others."""
    prng = np.random.default_rng([spec.seed, s, j])
    subtype = int(prng.choice(len(SUBTYPES), p=world.site_props[s]))
    grade = DEFAULT_GRADE_MAP[SUBTYPES[subtype]]
    # "arrangement": every subtype's tumour draws from the one pan-glioma mixture (same draw count)
    mix = prng.dirichlet((world.subtype_mix[subtype] if world.pan_mix is None else world.pan_mix) * 12 + 0.05)
    z = float(prng.normal())
    hazard = BASE_HAZARD[grade] * np.exp(0.6 * z)
    t_event = prng.exponential(1.0 / hazard)
    t_cens = prng.uniform(1.0, 100.0)
    months = round(float(min(t_event, t_cens)), 2)
    months = max(months, 0.01)
    censored = int(t_event > t_cens)
    miss = prng.random()
    no_path = miss < spec.missing_fraction
    no_gen = spec.missing_fraction <= miss < 2 * spec.missing_fraction
    case_id = f"TCGA-{code}-{j:04d}"
    base = {
        "case_id": case_id,
        "site": code,
        "age": round(float(prng.uniform(20, 80)), 1),
        "is_female": int(prng.random() < 0.45),
        "survival_months": months,
        "censorship": censored,
        "oncotree_code": SUBTYPES[subtype],
    }
    genomic = {c: np.nan for c in gen_cols} if no_gen else _genomic_row(world, subtype, z, prng)
    expression = np.array([genomic[f"{g}_rnaseq"] for g in world.genes])
    n_patches = int(np.clip(np.exp(prng.normal(np.log(spec.median_patches), 0.9)),
                            spec.min_patches, spec.max_patches))
    n_slides = 0 if no_path else (2 if prng.random() < spec.two_slide_fraction and n_patches >= 2 * spec.min_patches else 1)
    sizes = [n_patches] if n_slides == 1 else [n_patches // 2, n_patches - n_patches // 2][:n_slides]
    slide_ids = [f"{case_id}-01Z-00-DX{k + 1}" for k in range(n_slides)]
    necrotic = _write_slides(spec, world, s, sizes, slide_ids, mix, grade, bag_dir, prng)
    rows = [{**base, "slide_id": slide_id, **genomic} for slide_id in slide_ids] or [{**base, "slide_id": "", **genomic}]
    latent = {"site": code, "subtype": subtype, "grade": grade, "mix": mix, "z": z,
              "log_hazard": float(np.log(hazard)), "months": months, "censored": censored,
              "expression": np.nan_to_num(expression)}
    if spec.clustered and spec.clustered_variant in ("foci", "arrangement"):
        latent["necrosis"] = float(necrotic)
    if spec.clustered and spec.clustered_variant == "arrangement":  # the layout the generator used: the grade
        latent["layout"] = np.array([grade == g for g in ("II", "III", "IV")], dtype=float)
    return rows, latent


def generate(spec: SynthSpec, out: str | Path, overwrite: bool = False) -> dict:
    """Write a cohort to ``out`` (table.csv, signatures.csv, bags/, oracle.json, synth.json).

    The cohort is written to a temporary sibling folder and moved into place at the end, so
    an interrupted run never leaves a half-written cohort behind. Returns a small summary.
    """
    spec.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: directory exists and is not empty (use --overwrite)")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "bags").mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    world = _world(spec, rng)
    codes = site_codes(spec.sites)
    rows, latents = [], []
    gen_cols = _genomic_columns(world)
    for s, code in enumerate(codes):
        for j in range(spec.patients):
            patient_rows, latent = _patient(spec, world, s, code, j, gen_cols, tmp / "bags")
            rows.extend(patient_rows)
            latents.append(latent)
    columns = ["case_id", "slide_id", "site", "age", "is_female", "survival_months", "censorship", "oncotree_code"]
    pd.DataFrame(rows, columns=columns + gen_cols).to_csv(tmp / "table.csv", index=False)
    sig = pd.DataFrame({name: pd.Series(members) for name, members in zip(GROUP_NAMES, world.gene_groups)})
    sig.to_csv(tmp / "signatures.csv", index=False)
    oracle = oracle_metrics(latents, seed=spec.seed)
    (tmp / "oracle.json").write_text(json.dumps(oracle, indent=2))
    defaults = SynthSpec()
    # options added later appear only when set: old cohorts keep their bytes
    written = {k: v for k, v in asdict(spec).items()
               if k not in LATER_OPTIONS or getattr(spec, k) != getattr(defaults, k)}
    (tmp / "synth.json").write_text(json.dumps(written, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"patients": len(latents), "slides": sum(1 for r in rows if r["slide_id"]), "sites": len(codes), "out": str(out)}


def oracle_features(latent: dict) -> np.ndarray:
    """What the oracle sees of a patient: its true morphotype mixture and generated expression
    values, (clustered "foci" and "arrangement" cohorts) whether its slides show necrosis, and
    ("arrangement") the layout, one-hot over infiltrative / masses / necrotic masses."""
    extra = [latent["necrosis"]] if "necrosis" in latent else []
    layout = latent.get("layout", np.zeros(0))
    return np.concatenate([latent["mix"], latent["expression"], extra, layout])


def oracle_metrics(latents: list[dict], seed: int) -> dict:
    """Metrics of a simple model that sees the generator's latent variables.

    Subtype and grade: multinomial logistic regression on :func:`oracle_features` (the
    patient's true morphotype mixture, its generated expression values, zeros when genomics are
    missing; with clustered "foci" whether necrosis is shown, with "arrangement" also the layout), predictions
    pooled over leave-one-site-out folds (so every patient is scored by a model that never saw
    its site). Survival: Harrell's c-index of the true log-hazard.
    Models are judged against these numbers as an upper reference.
    """
    from lifelines.utils import concordance_index
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    x = np.array([oracle_features(lat) for lat in latents])
    sites = np.array([lat["site"] for lat in latents])
    grades = ("II", "III", "IV")
    targets = {
        "subtype": np.array([lat["subtype"] for lat in latents]),
        "grade": np.array([grades.index(lat["grade"]) for lat in latents]),
    }
    result: dict = {"method": "logistic regression on latent variables, leave-one-site-out pooled; "
                              "survival: c-index of the true log-hazard", "n": len(latents)}
    for task, y in targets.items():
        n_classes = int(y.max()) + 1 if len(y) else 0
        probs = np.zeros((len(y), max(n_classes, 1)))
        for site in np.unique(sites):
            test = sites == site
            train = ~test
            if len(np.unique(y[train])) < 2:
                probs[test] = np.bincount(y[train], minlength=n_classes) / max(train.sum(), 1)
                continue
            clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(x[train], y[train])
            probs[np.ix_(test, clf.classes_)] = clf.predict_proba(x[test])
        pred = probs.argmax(axis=1)
        entry = {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred))}
        present = np.unique(y)
        if len(present) > 1:
            sub = probs[:, present] / np.clip(probs[:, present].sum(axis=1, keepdims=True), 1e-12, None)
            entry["auc_macro"] = float(
                roc_auc_score(y, sub, multi_class="ovr", average="macro", labels=present)
                if len(present) > 2 else roc_auc_score(y == present[1], sub[:, 1])
            )
        result[task] = entry
    times = np.array([lat["months"] for lat in latents])
    events = 1 - np.array([lat["censored"] for lat in latents])
    risk = np.array([lat["log_hazard"] for lat in latents])
    result["survival"] = {"c_index": float(concordance_index(times, -risk, events))}
    return result


def split_by_site(data_dir: str | Path, out: str | Path) -> list[str]:
    """Copy a data directory into one data directory per site (``out/<site>/``), as hospitals hold it.

    Used to stage a local deployment; returns the site ids.
    """
    data_dir, out = Path(data_dir), Path(out)
    table = pd.read_csv(data_dir / "table.csv", dtype={"slide_id": str, "site": str})
    sites = sorted(table["site"].unique())
    for site in sites:
        dest = out / site
        (dest / "bags").mkdir(parents=True, exist_ok=True)
        part = table[table["site"] == site]
        part.to_csv(dest / "table.csv", index=False)
        shutil.copy(data_dir / "signatures.csv", dest / "signatures.csv")
        for slide in part["slide_id"].dropna():
            if slide:
                shutil.copy(bag_path(data_dir / "bags", slide), bag_path(dest / "bags", slide))
    return sites

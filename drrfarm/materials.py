"""Photon interaction data: mass attenuation coefficients of tissues, metals, elements and formulas.

Every coefficient comes from **xraydb** (``xraydb.mu_elam``: the Elam, Ravel & Sieber 2002 tables,
``kind="total"`` = photoelectric + coherent (Rayleigh) + incoherent (Compton) scattering), combined
with the mixture rule

    mu/rho(E) = sum_i w_i * (mu/rho)_i(E)        (w_i = mass fraction of element i)

Names are resolved in this order:

1. drrfarm's named materials (``known_materials()``) and their aliases ("soft tissue", "bone", "Ti" ...);
   compositions come from xraydb's own materials database where it has them (water, air, the pure
   metals), otherwise from NIST's published mass fractions (Hubbell & Seltzer, NIST SRD 126, Table 2,
   which takes the body tissues from ICRU Report 44) or from the alloy standard named per entry;
2. any other material in xraydb's database (``xraydb.get_materials()``: "pmma", "kapton", ...);
3. any chemical formula (case-sensitive, parsed by xraydb: "CsI", "H2O", "Ca10(PO4)6(OH)2", "Co");
4. materials added at run time with :func:`register_material`.

Energies are in keV (xraydb works in eV) and must lie in [1, 800] keV, where Elam's tables hold.
Results are cached per (material, energies) with ``functools.lru_cache``; callers get fresh copies.
xraydb is imported lazily (it costs ~0.7 s) so that ``import drrfarm.materials`` stays cheap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from drrfarm.errors import MaterialError

__all__ = [
    "MaterialInfo",
    "canonical_material_name",
    "known_materials",
    "mass_attenuation_cm2_g",
    "mass_energy_absorption_cm2_g",
    "material_info",
    "material_table",
    "nominal_density_g_cm3",
    "register_material",
]

MIN_ENERGY_KEV = 1.0
MAX_ENERGY_KEV = 800.0  # xraydb warns that Elam's tables are unreliable above 800 keV
ELECTRON_REST_ENERGY_KEV = 510.99895


@dataclass(frozen=True)
class _Entry:
    """A named material: either an xraydb material/formula or explicit mass fractions."""

    source: str
    xraydb_name: str | None = None  # name in xraydb's materials database
    formula: str | None = None  # chemical formula parsed by xraydb
    mass_fractions: Mapping[str, float] | None = None  # element symbol -> fraction by weight
    density_g_cm3: float | None = None  # None: take xraydb's stored density


_NIST_TABLE2 = "NIST SRD 126 (Hubbell & Seltzer), Table 2"

# Canonical drrfarm materials. Tissue mass fractions are NIST's values for the named entries.
_BUILTIN: dict[str, _Entry] = {
    # xraydb materials database entries (composition and density as xraydb stores them)
    "air": _Entry(source="xraydb materials database: 'air' (dry air, molar composition)", xraydb_name="air"),
    "water": _Entry(source="xraydb materials database: 'water' (H2O)", xraydb_name="water"),
    "titanium": _Entry(source="xraydb materials database: 'titanium'", xraydb_name="titanium"),
    "iron": _Entry(source="xraydb materials database: 'iron'", xraydb_name="iron"),
    "aluminium": _Entry(source="xraydb materials database: 'aluminum'", xraydb_name="aluminum"),
    "copper": _Entry(source="xraydb materials database: 'copper'", xraydb_name="copper"),
    "lead": _Entry(source="xraydb materials database: 'lead'", xraydb_name="lead"),
    "tungsten": _Entry(source="xraydb materials database: 'tungsten'", xraydb_name="tungsten"),
    # xraydb has no body tissues: NIST "... (ICRU-44)" mass fractions and densities
    "soft_tissue": _Entry(  # NIST "Tissue, Soft (ICRU-44)"
        source=f'{_NIST_TABLE2}: "Tissue, Soft (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.708, "Na": 0.002, "P": 0.003, "S": 0.003,
             "Cl": 0.002, "K": 0.003}
        ),
        density_g_cm3=1.06,
    ),
    "lung": _Entry(  # NIST "Lung Tissue (ICRU-44)"; density is of the tissue, not of inflated lung
        source=f'{_NIST_TABLE2}: "Lung Tissue (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.103, "C": 0.105, "N": 0.031, "O": 0.749, "Na": 0.002, "P": 0.002, "S": 0.003,
             "Cl": 0.003, "K": 0.002}
        ),
        density_g_cm3=1.05,
    ),
    "adipose": _Entry(  # NIST "Adipose Tissue (ICRU-44)"
        source=f'{_NIST_TABLE2}: "Adipose Tissue (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001, "Cl": 0.001}
        ),
        density_g_cm3=0.95,
    ),
    "muscle": _Entry(  # NIST "Muscle, Skeletal (ICRU-44)"
        source=f'{_NIST_TABLE2}: "Muscle, Skeletal (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002, "S": 0.003,
             "Cl": 0.001, "K": 0.004}
        ),
        density_g_cm3=1.05,
    ),
    "blood": _Entry(  # NIST "Blood, Whole (ICRU-44)"
        source=f'{_NIST_TABLE2}: "Blood, Whole (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001, "S": 0.002,
             "Cl": 0.003, "K": 0.002, "Fe": 0.001}
        ),
        density_g_cm3=1.06,
    ),
    "cortical_bone": _Entry(  # NIST "Bone, Cortical (ICRU-44)"
        source=f'{_NIST_TABLE2}: "Bone, Cortical (ICRU-44)"',
        mass_fractions=MappingProxyType(
            {"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001, "Mg": 0.002, "P": 0.103,
             "S": 0.003, "Ca": 0.225}
        ),
        density_g_cm3=1.92,
    ),
    # Detector scintillator: NIST "Cesium Iodide" density; composition is the formula
    "csi": _Entry(source=f'formula CsI; density from {_NIST_TABLE2}: "Cesium Iodide"', formula="CsI",
                  density_g_cm3=4.51),
    # Implant alloys: nominal compositions (mid-range of the standard's limits, Fe/Co balance)
    "steel": _Entry(  # ASTM F138 (implant-grade 316L stainless): Cr 17-19, Ni 13-15, Mo 2.25-3 %
        source="ASTM F138 316L stainless steel, nominal (Cr 18, Ni 14, Mo 2.75, Mn 2, Si 0.75, Fe bal.)",
        mass_fractions=MappingProxyType(
            {"Fe": 0.6247, "Cr": 0.18, "Ni": 0.14, "Mo": 0.0275, "Mn": 0.02, "Si": 0.0075, "C": 0.0003}
        ),
        density_g_cm3=8.0,
    ),
    "cobalt_chrome": _Entry(  # ASTM F75 cast Co-28Cr-6Mo
        source="ASTM F75 Co-28Cr-6Mo, nominal (Cr 28, Mo 6, Co bal.)",
        mass_fractions=MappingProxyType({"Co": 0.66, "Cr": 0.28, "Mo": 0.06}),
        density_g_cm3=8.3,
    ),
    "ti6al4v": _Entry(  # ASTM F136 Ti-6Al-4V ELI
        source="ASTM F136 Ti-6Al-4V, nominal (Al 6, V 4, Ti bal.)",
        mass_fractions=MappingProxyType({"Ti": 0.90, "Al": 0.06, "V": 0.04}),
        density_g_cm3=4.43,
    ),
}

# Aliases, keyed by the normalised spelling (lower case, spaces/hyphens -> underscores).
_ALIASES: dict[str, str] = {
    "soft_tissue": "soft_tissue", "tissue_soft": "soft_tissue", "tissue": "soft_tissue",
    "bone": "cortical_bone", "cortical_bone": "cortical_bone", "bone_cortical": "cortical_bone",
    "lung_tissue": "lung", "adipose_tissue": "adipose", "fat": "adipose",
    "skeletal_muscle": "muscle", "muscle_skeletal": "muscle", "whole_blood": "blood",
    "aluminum": "aluminium", "stainless_steel": "steel", "316l": "steel", "ss316l": "steel",
    "cocr": "cobalt_chrome", "cocrmo": "cobalt_chrome", "cobalt_chromium": "cobalt_chrome",
    "cesium_iodide": "csi", "caesium_iodide": "csi", "ti_6al_4v": "ti6al4v", "titanium_alloy": "ti6al4v",
    "liquid_water": "water", "dry_air": "air",
}
# Case-sensitive symbol aliases (so that "Co" stays cobalt and "CO" carbon monoxide).
_SYMBOL_ALIASES: dict[str, str] = {
    "Ti": "titanium", "Fe": "iron", "Al": "aluminium", "Cu": "copper", "Pb": "lead", "W": "tungsten",
    "CsI": "csi", "H2O": "water",
}

_REGISTERED: dict[str, _Entry] = {}


@dataclass(frozen=True)
class MaterialInfo:
    """What a material name resolved to (for provenance and error messages)."""

    name: str  # canonical name ("soft_tissue", "pmma", "CsI" ...)
    mass_fractions: tuple[tuple[str, float], ...]  # (element symbol, fraction by weight), sums to 1
    density_g_cm3: float | None  # nominal density; None for a formula xraydb has no density for
    source: str


def _normalise(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _known_list() -> str:
    return ", ".join(known_materials())


def _bad(name: object, why: str = "unknown material") -> MaterialError:
    return MaterialError(
        f"{why} {name!r}; known materials: {_known_list()}; also accepted: any element symbol, "
        "chemical formula (e.g. 'CsI') or xraydb material name"
    )


def canonical_material_name(name: str) -> str:
    """Canonical drrfarm name of ``name`` ("soft tissue" -> "soft_tissue"); MaterialError if unknown."""
    return _resolve(name).name


def _resolve(name: str) -> MaterialInfo:
    if not isinstance(name, str) or not name.strip():
        raise _bad(name, "material name must be a non-empty string, got")
    return _resolve_cached(name.strip())


@functools.lru_cache(maxsize=512)
def _resolve_cached(name: str) -> MaterialInfo:
    key = _SYMBOL_ALIASES.get(name)
    if key is None:
        norm = _normalise(name)
        key = norm if norm in _REGISTERED or norm in _BUILTIN else _ALIASES.get(norm)
    if key is not None:
        entry = _REGISTERED.get(key) or _BUILTIN[key]
        return _info_from_entry(key, entry)

    import xraydb

    found = xraydb.get_material(name.lower())
    if found is not None:
        formula, density = found
        return MaterialInfo(
            name=name.lower(),
            mass_fractions=_formula_mass_fractions(formula, name),
            density_g_cm3=float(density),
            source=f"xraydb materials database: {name.lower()!r}",
        )
    try:
        fractions = _formula_mass_fractions(name, name)
    except MaterialError:
        raise _bad(name) from None
    density: float | None = None
    if len(fractions) == 1 and xraydb.chemparse(name) == {fractions[0][0]: 1}:
        density = float(xraydb.atomic_density(fractions[0][0]))
        source = f"element {name}; xraydb atomic data"
    else:
        match = xraydb.find_material(name)
        if match is not None:
            density = float(match.density)
        source = f"chemical formula {name}" + (f" (density: xraydb {match.name!r})" if match else "")
    return MaterialInfo(name=name, mass_fractions=fractions, density_g_cm3=density, source=source)


def _info_from_entry(key: str, entry: _Entry) -> MaterialInfo:
    if entry.mass_fractions is not None:
        total = sum(entry.mass_fractions.values())
        fractions = tuple((el, w / total) for el, w in entry.mass_fractions.items())
        return MaterialInfo(key, fractions, entry.density_g_cm3, entry.source)
    if entry.xraydb_name is not None:
        import xraydb

        formula, density = xraydb.get_material(entry.xraydb_name)
        if entry.density_g_cm3 is not None:
            density = entry.density_g_cm3
        return MaterialInfo(key, _formula_mass_fractions(formula, key), float(density), entry.source)
    assert entry.formula is not None
    return MaterialInfo(key, _formula_mass_fractions(entry.formula, key), entry.density_g_cm3, entry.source)


def _formula_mass_fractions(formula: str, name: str) -> tuple[tuple[str, float], ...]:
    """Mass fractions of a chemical formula, from xraydb's parser and atomic masses."""
    import xraydb

    try:
        counts = xraydb.chemparse(formula)
        masses = {el: n * xraydb.atomic_mass(el) for el, n in counts.items()}
    except Exception as exc:  # xraydb raises ValueError/KeyError for bad formulas
        raise MaterialError(f"material {name!r}: cannot parse formula {formula!r}: {exc}") from exc
    total = sum(masses.values())
    if not counts or not total > 0:
        raise MaterialError(f"material {name!r}: formula {formula!r} has no atoms")
    return tuple((el, m / total) for el, m in masses.items())


def material_info(name: str) -> MaterialInfo:
    """Resolved composition, nominal density and data source of ``name``."""
    return _resolve(name)


def known_materials() -> list[str]:
    """Canonical names of drrfarm's named materials (plus registered ones), sorted.

    Element symbols, chemical formulas and xraydb's own material names are accepted as well.
    """
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def nominal_density_g_cm3(name: str) -> float:
    """Nominal (tabulated) density of ``name`` in g/cm3; MaterialError if it has none (a bare formula)."""
    info = _resolve(name)
    if info.density_g_cm3 is None:
        raise MaterialError(f"material {name!r}: no nominal density is known for this formula")
    return info.density_g_cm3


def register_material(
    name: str, mass_fractions: Mapping[str, float], density_g_cm3: float, source: str = "user"
) -> str:
    """Add a named material from element mass fractions (normalised to sum 1); returns its canonical name.

    Names already known (built-in, alias, registered) cannot be redefined.
    """
    import xraydb

    if not isinstance(name, str) or not _normalise(name):
        raise MaterialError(f"register_material: name must be a non-empty string, got {name!r}")
    key = _normalise(name)
    if key in _BUILTIN or key in _ALIASES or key in _REGISTERED or name.strip() in _SYMBOL_ALIASES:
        raise MaterialError(f"register_material: material {name!r} already exists")
    if not mass_fractions:
        raise MaterialError(f"register_material {name!r}: mass_fractions is empty")
    for el, w in mass_fractions.items():
        try:
            xraydb.atomic_number(el)
        except Exception:
            raise MaterialError(f"register_material {name!r}: {el!r} is not an element symbol") from None
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise MaterialError(f"register_material {name!r}: mass fraction of {el} must be >= 0, got {w!r}")
    if not sum(mass_fractions.values()) > 0:
        raise MaterialError(f"register_material {name!r}: mass fractions sum to 0")
    if not (isinstance(density_g_cm3, (int, float)) and math.isfinite(density_g_cm3) and density_g_cm3 > 0):
        raise MaterialError(f"register_material {name!r}: density_g_cm3 must be > 0, got {density_g_cm3!r}")
    _REGISTERED[key] = _Entry(
        source=source, mass_fractions=MappingProxyType(dict(mass_fractions)), density_g_cm3=float(density_g_cm3)
    )
    _resolve_cached.cache_clear()
    _mu_cached.cache_clear()
    _mu_en_cached.cache_clear()
    return key


def _energies_tuple(energies_kev: object, what: str) -> tuple[np.ndarray, tuple[float, ...]]:
    try:
        e = np.asarray(energies_kev, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MaterialError(f"{what}: energies_kev must be numeric, got {energies_kev!r}") from exc
    flat = e.ravel()
    if flat.size and not (
        np.all(np.isfinite(flat)) and flat.min() >= MIN_ENERGY_KEV and flat.max() <= MAX_ENERGY_KEV
    ):
        got = "non-finite values" if not np.all(np.isfinite(flat)) else f"[{flat.min():g}, {flat.max():g}]"
        raise MaterialError(
            f"{what}: energies_kev must be finite and within [{MIN_ENERGY_KEV:g}, {MAX_ENERGY_KEV:g}] keV, "
            f"got {got}"
        )
    return e, tuple(float(x) for x in flat)


def mass_attenuation_cm2_g(material: str, energies_kev: np.ndarray | Iterable[float] | float) -> np.ndarray:
    """Total mass attenuation coefficient mu/rho (cm2/g, coherent scattering included).

    energies_kev: any shape (B,) typically, keV. Returns float64 of the same shape.
    """
    info = _resolve(material)
    e, etuple = _energies_tuple(energies_kev, f"mass_attenuation_cm2_g({material!r})")
    return np.array(_mu_cached(info.name, etuple), dtype=np.float64).reshape(e.shape)


@functools.lru_cache(maxsize=2048)
def _mu_cached(name: str, energies_kev: tuple[float, ...]) -> tuple[float, ...]:
    import xraydb

    info = _resolve_cached(name)
    e_ev = np.asarray(energies_kev, dtype=np.float64) * 1e3
    if e_ev.size == 0:
        return ()
    mu = np.zeros_like(e_ev)
    for el, w in info.mass_fractions:
        mu += w * np.asarray(xraydb.mu_elam(el, e_ev, kind="total"), dtype=np.float64)
    return tuple(mu.tolist())


def material_table(names: Iterable[str], energies_kev: np.ndarray | Iterable[float]) -> np.ndarray:
    """(B, M) float64 table of mu/rho in cm2/g: row b = energy energies_kev[b], column m = names[m]."""
    if isinstance(names, str):
        raise MaterialError(f"material_table: names must be a list of names, not the string {names!r}")
    names = list(names)
    if not names:
        raise MaterialError("material_table: names is empty")
    e, _ = _energies_tuple(energies_kev, "material_table")
    if e.ndim != 1:
        raise MaterialError(f"material_table: energies_kev must be 1-D (B,), got shape {e.shape}")
    table = np.empty((e.size, len(names)), dtype=np.float64)
    for m, name in enumerate(names):
        table[:, m] = mass_attenuation_cm2_g(name, e)
    return table


# ---------------------------------------------------------------------------------------------------
# Mass energy-absorption coefficient (approximate; xraydb has no mu_en tables)
# ---------------------------------------------------------------------------------------------------


def _compton_energy_transfer_fraction(energies_kev: np.ndarray) -> np.ndarray:
    """Mean fraction of the photon energy given to the electron in a free-electron (Klein-Nishina) Compton
    event, by numerical integration over the scattering angle. (B,) -> (B,)."""
    k = np.asarray(energies_kev, dtype=np.float64)[:, None] / ELECTRON_REST_ENERGY_KEV
    cos_t = np.linspace(-1.0, 1.0, 2001)[None, :]
    ratio = 1.0 / (1.0 + k * (1.0 - cos_t))  # E'/E
    dsigma = ratio**2 * (ratio + 1.0 / ratio - (1.0 - cos_t**2))
    return np.trapezoid(dsigma * (1.0 - ratio), cos_t, axis=1) / np.trapezoid(dsigma, cos_t, axis=1)


def _k_fluorescence_fraction(element: str, energies_kev: np.ndarray) -> np.ndarray:
    """Fraction of a photoabsorbed photon's energy re-emitted as K-shell fluorescence (escapes). (B,)."""
    import xraydb

    try:
        edge = xraydb.xray_edge(element, "K")
        lines = xraydb.xray_lines(element, "K")
    except Exception:
        return np.zeros_like(energies_kev)
    if edge is None or not lines or edge.jump_ratio is None or edge.jump_ratio <= 1.0:
        return np.zeros_like(energies_kev)
    intensity = sum(line.intensity for line in lines.values())
    if intensity <= 0:
        return np.zeros_like(energies_kev)
    mean_line_kev = sum(line.energy * line.intensity for line in lines.values()) / intensity / 1e3
    p_k = (edge.jump_ratio - 1.0) / edge.jump_ratio  # share of photoabsorption in the K shell
    return np.where(energies_kev * 1e3 >= edge.energy, p_k * edge.fyield * mean_line_kev / energies_kev, 0.0)


def mass_energy_absorption_cm2_g(
    material: str, energies_kev: np.ndarray | Iterable[float] | float
) -> np.ndarray:
    """Approximate mass energy-absorption coefficient mu_en/rho (cm2/g), same shape as energies_kev.

    Built from xraydb's partial cross sections (Elam):
    ``mu_en = photo * (1 - K-fluorescence escape) + incoherent * <T>/E (Klein-Nishina)``;
    coherent scattering deposits nothing. Ignored: L-shell fluorescence, bremsstrahlung of the secondary
    electrons. Versus NIST SRD 126 for air and water, 10-150 keV: within 1.5%. For high-Z media (Pb) it
    is coarser (about +10% at 100 keV, L fluorescence not subtracted). Used for air kerma (HVL) and
    detector absorption.
    """
    info = _resolve(material)
    e, etuple = _energies_tuple(energies_kev, f"mass_energy_absorption_cm2_g({material!r})")
    return np.array(_mu_en_cached(info.name, etuple), dtype=np.float64).reshape(e.shape)


@functools.lru_cache(maxsize=512)
def _mu_en_cached(name: str, energies_kev: tuple[float, ...]) -> tuple[float, ...]:
    import xraydb

    info = _resolve_cached(name)
    e_kev = np.asarray(energies_kev, dtype=np.float64)
    if e_kev.size == 0:
        return ()
    compton = _compton_energy_transfer_fraction(e_kev)
    out = np.zeros_like(e_kev)
    for el, w in info.mass_fractions:
        photo = np.asarray(xraydb.mu_elam(el, e_kev * 1e3, kind="photo"), dtype=np.float64)
        incoh = np.asarray(xraydb.mu_elam(el, e_kev * 1e3, kind="incoh"), dtype=np.float64)
        out += w * (photo * (1.0 - _k_fluorescence_fraction(el, e_kev)) + incoh * compton)
    return tuple(out.tolist())

"""Class name -> lesion pattern: what makes one phantom class look different from another.

Known names (case and punctuation ignored) get the pattern a radiologist
would expect: ``covid`` bilateral peripheral lower-zone ground-glass
opacities, ``pneumonia`` one dense lobar consolidation, ``normal`` clear
lungs, and a few more (effusion, pneumothorax, edema, fibrosis, nodules, mass,
emphysema/COPD, cardiomegaly). Any other name takes the next unused pattern
from a pool, then nodule patterns whose count, size and zone are keyed by
its position, so ``--classes a,b,c,d,e`` gives five distinct, learnable
classes. The assignment depends only on the ordered class list.

Each pattern returns an additive intensity field (positive = denser) and a
boolean lesion mask; a mask is empty only for clear lungs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cxr_ray.synth.phantom import Anatomy, Scene, blob, smooth_noise

LesionField = tuple[np.ndarray, np.ndarray]


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _span(scene: Scene, side: int) -> tuple[float, float]:
    """Top (apex) and bottom (dome) of the lung on ``side``, in v."""
    return scene.anatomy.lung_top, (scene.dome_left if side > 0 else scene.dome_right)


def _lateral_u(scene: Scene, side: int, lo: float, hi: float, rng: np.random.Generator) -> float:
    a = scene.anatomy
    return side * (a.lung_cx + a.lung_w * rng.uniform(lo, hi))


# --------------------------------------------------------------------------- patterns


def _clear(scene: Scene, rng, visible, variant) -> LesionField:
    return np.zeros(scene.shape, np.float32), np.zeros(scene.shape, bool)


def _ground_glass(scene: Scene, rng, visible, variant) -> LesionField:
    """Bilateral, peripheral, lower-zone hazy opacities (COVID-19 pneumonia)."""
    field = np.zeros(scene.shape, np.float32)
    for side in (-1, 1):
        top, bottom = _span(scene, side)
        for _ in range(int(rng.integers(2, 5))):
            cu = _lateral_u(scene, side, 0.3, 0.75, rng)
            cv = rng.uniform(top + 0.5 * (bottom - top), bottom - 0.06)
            sx = rng.uniform(0.07, 0.11)
            field += rng.uniform(0.75, 1.0) * blob(scene, cu, cv, sx, sx * rng.uniform(1.0, 1.5))
    field = np.minimum(field, 1.3)
    texture = 0.6 + 0.4 * smooth_noise(rng, scene.shape, cells=22)
    lesion = rng.uniform(0.15, 0.2) * field * texture * visible
    return lesion, field > 0.45


def _consolidation(scene: Scene, rng, visible, variant) -> LesionField:
    """One dense lobar consolidation in one lung, bounded by a fissure (bacterial pneumonia)."""
    a = scene.anatomy
    side = int(rng.choice([-1, 1]))
    zone = int(rng.integers(0, 3))  # upper, middle, lower
    top, bottom = _span(scene, side)
    frac = (0.28, 0.52, 0.76)[zone]
    cv = top + frac * (bottom - top) + rng.uniform(-0.04, 0.04)
    lo, hi = (0.1, 0.4) if side > 0 and zone > 0 else (-0.15, 0.3)  # stay clear of the heart
    cu = _lateral_u(scene, side, lo, hi, rng)
    rx, ry = rng.uniform(0.15, 0.2), rng.uniform(0.13, 0.18)
    irregular = 0.06 * (smooth_noise(rng, scene.shape, cells=10) - 0.5)
    region = scene.ramp(scene.ellipse(cu, cv, rx, ry, power=2.5) + irregular, width=0.045)
    if zone == 0:  # upper lobe: sharp horizontal fissure below
        region = region * scene.ramp(cv + 0.6 * ry - scene.v, width=0.01)
    elif zone == 2:  # lower lobe: oblique fissure above
        region = region * scene.ramp(scene.v - (cv - 0.7 * ry) - 0.15 * side * (scene.u - cu), width=0.01)
    # air bronchograms: thin dark branches inside the opacity
    hu, hv = side * 0.19, a.lung_top + 0.62
    theta = np.arctan2(scene.v - hv, (scene.u - hu) * side)
    r = np.hypot(scene.u - hu, scene.v - hv)
    bronchi = (np.cos(17 * theta + 4 * r) > 0.94).astype(np.float32)
    amp = rng.uniform(0.30, 0.38)
    texture = 0.85 + 0.15 * smooth_noise(rng, scene.shape, cells=18)
    lesion = amp * region * texture * (1.0 - 0.3 * bronchi) * visible
    return lesion, region > 0.5


def _nodule_layout(variant: int) -> tuple[int, float, tuple[int, ...], tuple[float, float]]:
    count = (1, 3, 6)[variant % 3]
    radius = (0.06, 0.04, 0.027)[variant % 3]
    sides, band = [
        ((-1,), (0.15, 0.45)),  # right upper
        ((1,), (0.55, 0.85)),  # left lower
        ((-1, 1), (0.1, 0.4)),  # bilateral upper
        ((-1, 1), (0.55, 0.85)),  # bilateral lower
    ][(variant // 3) % 4]
    return count, radius, sides, band


def _nodules(scene: Scene, rng, visible, variant) -> LesionField:
    """Round well-defined nodules; count, size and zone depend on ``variant``."""
    count, radius, sides, band = _nodule_layout(variant)
    field = np.zeros(scene.shape, np.float32)
    for i in range(count):
        side = sides[i % len(sides)]
        top, bottom = _span(scene, side)
        cu = _lateral_u(scene, side, 0.0 if side < 0 else 0.15, 0.6, rng)
        cv = top + (bottom - top) * rng.uniform(*band)
        r = radius * rng.uniform(0.85, 1.15)
        field = np.maximum(field, scene.ramp(scene.ellipse(cu, cv, r, r), width=0.012))
    return rng.uniform(0.24, 0.3) * field * visible, field > 0.5


def _effusion(scene: Scene, rng, visible, variant) -> LesionField:
    """Pleural fluid filling one lung base with a meniscus rising laterally."""
    a = scene.anatomy
    side = int(rng.choice([-1, 1]))
    _, bottom = _span(scene, side)
    level = bottom - rng.uniform(0.12, 0.25)
    lateral = np.clip((side * scene.u - (a.lung_cx - a.lung_w)) / (2 * a.lung_w), 0.0, 1.0)
    region = scene.ramp(scene.v - (level - 0.22 * lateral * lateral), width=0.04) * scene.lung(side) * visible
    return a.lung_depth * 0.95 * region, region > 0.5


def _pneumothorax(scene: Scene, rng, visible, variant) -> LesionField:
    """Air outside a partly collapsed lung: a lucent lateral crescent and a pleural line."""
    a = scene.anatomy
    side = int(rng.choice([-1, 1]))
    f = rng.uniform(0.68, 0.8)
    cy = (a.lung_top + scene.lung_bottom) / 2 + 0.05
    ry = (scene.lung_bottom - a.lung_top) / 2 * rng.uniform(0.82, 0.92)
    collapsed = scene.ellipse(side * (a.lung_cx - a.lung_w * (1 - f)), cy, a.lung_w * f, ry, power=2.3)
    crescent = scene.lung(side) * (1.0 - scene.ramp(collapsed, width=0.01))
    line = scene.ramp(0.006 - np.abs(collapsed), width=0.006) * scene.lung(side) * visible
    return -0.07 * crescent + 0.1 * line, crescent > 0.5


def _edema(scene: Scene, rng, visible, variant) -> LesionField:
    """Bilateral perihilar "bat wing" haze."""
    a = scene.anatomy
    field = np.zeros(scene.shape, np.float32)
    for side in (-1, 1):
        cv = a.lung_top + 0.62 + rng.uniform(-0.04, 0.04)
        field += blob(scene, side * rng.uniform(0.2, 0.26), cv, rng.uniform(0.12, 0.15), rng.uniform(0.17, 0.22))
    texture = 0.75 + 0.25 * smooth_noise(rng, scene.shape, cells=16)
    return rng.uniform(0.15, 0.2) * field * texture * visible, field > 0.45


def _fibrosis(scene: Scene, rng, visible, variant) -> LesionField:
    """Bilateral lower-zone peripheral reticulation (a net of fine lines)."""
    field = np.zeros(scene.shape, np.float32)
    for side in (-1, 1):
        _, bottom = _span(scene, side)
        field += blob(scene, _lateral_u(scene, side, 0.35, 0.55, rng), bottom - 0.13, 0.12, 0.16)
    u, v = scene.u, scene.v
    phase = rng.uniform(0, 2 * math.pi)
    net = (np.abs(np.sin(55 * u + 2.5 * np.sin(31 * v) + phase)) < 0.3) | (
        np.abs(np.sin(55 * v + 2.5 * np.sin(29 * u) + phase)) < 0.3
    )
    zone = np.clip(field, 0.0, 1.0)
    return (0.16 * net + 0.05) * zone * visible, zone > 0.4


def _mass(scene: Scene, rng, visible, variant) -> LesionField:
    """One large spiculated upper-zone mass."""
    side = int(rng.choice([-1, 1]))
    top, bottom = _span(scene, side)
    cu = _lateral_u(scene, side, -0.05, 0.35, rng)
    cv = top + (bottom - top) * rng.uniform(0.2, 0.35)
    r0 = rng.uniform(0.08, 0.11)
    theta = np.arctan2(scene.v - cv, scene.u - cu)
    radius = r0 * (1.0 + 0.18 * np.cos(7 * theta + rng.uniform(0, 2 * math.pi)))
    region = scene.ramp(radius - np.hypot(scene.u - cu, scene.v - cv), width=0.015)
    return rng.uniform(0.3, 0.36) * region * visible, region > 0.5


def _emphysema(scene: Scene, rng, visible, variant) -> LesionField:
    """Hyperinflation (see ``adjust_anatomy``) plus lucent upper-zone bullae."""
    field = np.zeros(scene.shape, np.float32)
    for _ in range(int(rng.integers(2, 4))):
        side = int(rng.choice([-1, 1]))
        top, bottom = _span(scene, side)
        cu = _lateral_u(scene, side, 0.0, 0.55, rng)
        cv = top + (bottom - top) * rng.uniform(0.12, 0.35)
        r = rng.uniform(0.05, 0.08)
        field = np.maximum(field, scene.ramp(scene.ellipse(cu, cv, r, r), width=0.01))
    return -0.09 * field * visible, field > 0.5


def _cardiomegaly(scene: Scene, rng, visible, variant) -> LesionField:
    """The enlarged heart itself (drawn through ``adjust_anatomy``) is the finding."""
    return np.zeros(scene.shape, np.float32), scene.heart() > 0.5


def _hyperinflate(a: Anatomy) -> Anatomy:
    return replace(a, dome=a.dome + 0.09, lung_depth=a.lung_depth + 0.05, heart_size=a.heart_size * 0.85,
                   lung_w=a.lung_w + 0.015)


def _big_heart(a: Anatomy) -> Anatomy:
    return replace(a, heart_size=a.heart_size * 1.45, heart_cx=a.heart_cx + 0.04)


@dataclass(frozen=True)
class _Kind:
    render: object
    adjust: object = None
    mask_in_lung: bool = True


KINDS: dict[str, _Kind] = {
    "clear": _Kind(_clear),
    "ground_glass": _Kind(_ground_glass),
    "consolidation": _Kind(_consolidation),
    "nodules": _Kind(_nodules),
    "effusion": _Kind(_effusion),
    "pneumothorax": _Kind(_pneumothorax),
    "edema": _Kind(_edema),
    "fibrosis": _Kind(_fibrosis),
    "mass": _Kind(_mass),
    "emphysema": _Kind(_emphysema, _hyperinflate),
    "cardiomegaly": _Kind(_cardiomegaly, _big_heart, mask_in_lung=False),
}

ALIASES: dict[str, str] = {
    **dict.fromkeys(["normal", "healthy", "nofinding", "negative", "control"], "clear"),
    **dict.fromkeys(["covid", "covid19", "sarscov2", "coronavirus", "covidpneumonia"], "ground_glass"),
    **dict.fromkeys(["pneumonia", "bacterialpneumonia", "lobarpneumonia", "viralpneumonia", "consolidation"],
                    "consolidation"),
    **dict.fromkeys(["nodule", "nodules"], "nodules"),
    **dict.fromkeys(["effusion", "pleuraleffusion"], "effusion"),
    "pneumothorax": "pneumothorax",
    **dict.fromkeys(["edema", "oedema", "pulmonaryedema", "pulmonaryoedema"], "edema"),
    **dict.fromkeys(["fibrosis", "pulmonaryfibrosis", "ild"], "fibrosis"),
    **dict.fromkeys(["mass", "lungcancer", "cancer", "tuberculosis", "tb"], "mass"),
    **dict.fromkeys(["emphysema", "copd", "chronicobstructivepulmonarydisease"], "emphysema"),
    "cardiomegaly": "cardiomegaly",
}

# Patterns handed to names that are not aliases, in this order; then nodule variants.
_POOL = ("nodules", "effusion", "pneumothorax", "edema", "fibrosis", "mass", "emphysema", "cardiomegaly")


@dataclass(frozen=True)
class Pattern:
    """The lesion pattern of one class."""

    class_name: str
    kind: str
    variant: int = 0

    @property
    def mask_in_lung(self) -> bool:
        return KINDS[self.kind].mask_in_lung

    @property
    def is_clear(self) -> bool:
        return self.kind == "clear"

    def adjust_anatomy(self, anatomy: Anatomy) -> Anatomy:
        adjust = KINDS[self.kind].adjust
        return adjust(anatomy) if adjust else anatomy  # type: ignore[operator]

    def render(self, scene: Scene, rng: np.random.Generator, visible: np.ndarray) -> LesionField:
        field, mask = KINDS[self.kind].render(scene, rng, visible, self.variant)  # type: ignore[operator]
        return field.astype(np.float32, copy=False), np.asarray(mask, dtype=bool)

    def describe(self) -> str:
        return self.kind if self.kind != "nodules" else f"nodules(variant={self.variant})"


def assign_patterns(classes: Sequence[str]) -> dict[str, Pattern]:
    """A distinct pattern for every class name (deterministic in the list order)."""
    used: set[tuple[str, int]] = set()
    out: dict[str, Pattern] = {}
    pending: list[str] = []
    for name in classes:  # known names first claim their own pattern
        kind = ALIASES.get(_key(name))
        if kind is not None and (kind, 0) not in used:
            used.add((kind, 0))
            out[name] = Pattern(name, kind)
        else:
            pending.append(name)
    pool = [(kind, 0) for kind in _POOL]
    next_variant = 1
    for name in pending:
        while pool and pool[0] in used:
            pool.pop(0)
        if pool:
            kind, variant = pool.pop(0)
        else:
            while ("nodules", next_variant) in used:
                next_variant += 1
            kind, variant = "nodules", next_variant
        used.add((kind, variant))
        out[name] = Pattern(name, kind, variant)
    return {name: out[name] for name in classes}

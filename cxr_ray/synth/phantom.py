"""Procedural chest-radiograph phantoms: anatomy plus one class-specific lesion pattern.

Everything is drawn with vectorised numpy on a normalised grid (``v`` runs
-1 at the top to +1 at the bottom, ``u`` is horizontal in the same units, 0
at the midline) and blurred with ``scipy.ndimage``. Intensities follow the
decoder's convention: float32 in [0, 1], 1.0 = most attenuating (bone white),
so lungs are dark, ribs / spine / heart bright.

Image left is the patient's right (PA convention): the heart and the lower
left hemidiaphragm sit on the image's right side (``u > 0``).

The pictures are not meant to fool a radiologist. They are meant to give a
CNN a signal that is (a) learnable, (b) localised where a heatmap should
point (each lesion comes with a mask), and (c) carried by patient-level
nuisance variation (body size, lung shape, exposure) that a model must
ignore, so that patient-level splits matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """Patient-level shape and density: stable across one patient's images."""

    aspect: float  # image width / height
    body_half_width: float
    tissue: float  # soft-tissue density
    lung_cx: float  # lung centres at +-lung_cx
    lung_w: float
    lung_top: float  # apex height (v)
    dome: float  # top of the right hemidiaphragm (v); the left one sits lower
    lung_depth: float  # how much darker aerated lung is than soft tissue
    heart_size: float
    heart_cx: float
    rib_spacing: float
    rib_phase: float
    vessel_phase: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """One patient's anatomy."""
    return Anatomy(
        aspect=float(rng.choice([1.0, 0.94, 0.88, 0.82])),
        body_half_width=float(rng.uniform(0.78, 0.95)),
        tissue=float(rng.uniform(0.40, 0.50)),
        lung_cx=float(rng.uniform(0.35, 0.39)),
        lung_w=float(rng.uniform(0.26, 0.31)),
        lung_top=float(rng.uniform(-0.80, -0.68)),
        dome=float(rng.uniform(0.28, 0.42)),
        lung_depth=float(rng.uniform(0.27, 0.33)),
        heart_size=float(rng.uniform(0.2, 0.25)),
        heart_cx=float(rng.uniform(0.1, 0.16)),
        rib_spacing=float(rng.uniform(0.125, 0.16)),
        rib_phase=float(rng.uniform(0, 1)),
        vessel_phase=float(rng.uniform(0, 2 * math.pi)),
    )


@dataclass(frozen=True)
class Pose:
    """Image-level variation: positioning, exposure, detector noise."""

    dx: float
    dy: float
    angle: float  # radians
    gamma: float
    noise: float
    blur: float  # pixels at 256 px, scaled with the image
    view: str  # "PA" | "AP"


def sample_pose(rng: np.random.Generator, view: str) -> Pose:
    return Pose(
        dx=float(rng.uniform(-0.04, 0.04)),
        dy=float(rng.uniform(-0.04, 0.04)),
        angle=float(rng.uniform(-0.05, 0.05)),
        gamma=float(rng.uniform(0.85, 1.15)),
        noise=float(rng.uniform(0.008, 0.025)),
        blur=float(rng.uniform(0.6, 1.1)),
        view=view,
    )


@lru_cache(maxsize=16)
def _base_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    scale = 2.0 / (height - 1)
    v = (np.arange(height, dtype=np.float32) * scale - 1.0)[:, None]
    u = (np.arange(width, dtype=np.float32) - (width - 1) / 2.0)[None, :] * np.float32(scale)
    return u, v


def image_shape(size: int, anatomy: Anatomy) -> tuple[int, int]:
    width = int(round(size * anatomy.aspect / 2.0)) * 2
    return size, width


class Scene:
    """The grid and the anatomical regions one lesion pattern needs."""

    def __init__(self, anatomy: Anatomy, pose: Pose, shape: tuple[int, int]):
        self.anatomy = anatomy
        self.pose = pose
        self.shape = shape
        u0, v0 = _base_grid(*shape)
        ca, sa = math.cos(pose.angle), math.sin(pose.angle)
        du, dv = u0 - pose.dx, v0 - pose.dy
        self.u = (ca * du + sa * dv).astype(np.float32)
        self.v = (-sa * du + ca * dv).astype(np.float32)
        a = anatomy
        self.edge = 2.5 * 2.0 / shape[0]  # soft edge, ~2.5 px
        self.heart_scale = 1.12 if pose.view == "AP" else 1.0
        self.dome_right = a.dome
        self.dome_left = a.dome + 0.05
        self.lung_bottom = max(self.dome_right, self.dome_left) + 0.12

    # regions ----------------------------------------------------------------
    def ramp(self, signed: np.ndarray, width: float | None = None) -> np.ndarray:
        """Soft indicator of ``signed > 0`` (a linear ramp ``width`` wide)."""
        w = self.edge if width is None else max(width, self.edge)
        return np.clip(0.5 + signed / w, 0.0, 1.0)

    def ellipse(self, cx, cy, rx, ry, power: float = 2.0) -> np.ndarray:
        """Signed inside-ness of a (super)ellipse, roughly in grid units near its edge."""
        du = np.abs(self.u - cx) / rx
        dv = np.abs(self.v - cy) / ry
        if power == 2.0:
            r = np.sqrt(du * du + dv * dv)
        elif power == 4.0:
            du, dv = du * du, dv * dv
            r = np.sqrt(np.sqrt(du * du + dv * dv))
        elif power == 3.0:
            r = np.cbrt(du * du * du + dv * dv * dv)
        else:
            r = (du**power + dv**power) ** (1.0 / power)
        return (1.0 - r) * min(rx, ry)

    def dome_curve(self, side: int) -> np.ndarray:
        """Height (v) of the hemidiaphragm under the lung on ``side`` (-1 right, +1 left)."""
        a = self.anatomy
        top = self.dome_left if side > 0 else self.dome_right
        x = (self.u - side * (a.lung_cx - 0.02)) / (a.lung_w + 0.05)
        return top + 0.16 * x * x

    def lung(self, side: int) -> np.ndarray:
        a = self.anatomy
        cy = (a.lung_top + self.lung_bottom) / 2.0
        ry = (self.lung_bottom - a.lung_top) / 2.0
        inside = self.ellipse(side * a.lung_cx, cy, a.lung_w, ry, power=2.3)
        below_dome = self.dome_curve(side) - self.v
        return self.ramp(np.minimum(inside, below_dome))

    def heart(self) -> np.ndarray:
        a = self.anatomy
        size = a.heart_size * self.heart_scale
        cy = self.dome_left - 0.55 * size
        return self.ramp(self.ellipse(a.heart_cx, cy, size * 1.3, size * 0.95), width=0.05)

    def mediastinum(self) -> np.ndarray:
        a = self.anatomy
        half = 0.075 + 0.03 * np.clip((self.v + 0.2) / 0.6, 0.0, 1.0)
        band = self.ramp(half - np.abs(self.u - 0.01), width=0.03)
        knob = self.ramp(self.ellipse(0.11, a.lung_top + 0.42, 0.06, 0.055), width=0.03)
        return np.maximum(band * (self.v < self.dome_left + 0.1), knob)


# --------------------------------------------------------------------------- drawing helpers


def blob(scene: Scene, cx, cy, sx, sy=None) -> np.ndarray:
    """An anisotropic Gaussian bump with peak 1."""
    sy = sx if sy is None else sy
    du = (scene.u - cx) / sx
    dv = (scene.v - cy) / sy
    return np.exp(-0.5 * (du * du + dv * dv))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 12) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.random((cells, max(2, int(round(cells * shape[1] / shape[0])))), dtype=np.float32)
    return upsample(coarse, shape)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # bool (H, W): the lesion
    lung: np.ndarray  # bool (H, W): visible lung fields (for checks)


def _work_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Anatomy is smooth: draw it at half resolution above 192 px and upsample (4x cheaper)."""
    if shape[0] < 192:
        return shape
    return (shape[0] + 1) // 2, (shape[1] + 1) // 2


def upsample(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 (h, w) array to ``shape``."""
    if array.shape == shape:
        return array
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def render_chest(anatomy: Anatomy, pose: Pose, pattern, rng: np.random.Generator, size: int) -> Rendered:
    """Draw one frontal radiograph with ``pattern``'s lesion (see :mod:`cxr_ray.synth.patterns`)."""
    anatomy = pattern.adjust_anatomy(anatomy)
    shape = image_shape(size, anatomy)
    scene = Scene(anatomy, pose, _work_shape(shape))
    a = anatomy
    u, v = scene.u, scene.v

    body = scene.ramp(scene.ellipse(0.0, 0.12, a.body_half_width, 1.25, power=4.0), width=0.06)
    heart = scene.heart()
    mediastinum = scene.mediastinum()
    lungs = np.maximum(scene.lung(-1), scene.lung(+1))
    visible = lungs * (1.0 - heart) * (1.0 - mediastinum)
    below = np.maximum(v - np.where(u > 0, scene.dome_curve(+1), scene.dome_curve(-1)), 0.0)
    abdomen = scene.ramp(below, width=0.03) * body

    # skeleton: spine, posterior + anterior ribs, clavicles
    spine = scene.ramp(0.055 - np.abs(u), width=0.02) * (
        0.8 + 0.2 * np.cos(2 * math.pi * v / (a.rib_spacing * 0.9))
    )
    au = np.abs(u)
    cage = scene.ramp(
        np.minimum(
            scene.ellipse(0.0, (a.lung_top + scene.lung_bottom) / 2, a.lung_cx + a.lung_w + 0.05,
                          (scene.lung_bottom - a.lung_top) / 2 + 0.06),
            au - 0.06,
        ),
        width=0.04,
    )
    posterior = (v + 0.25 * au - 0.9 * au * au) / a.rib_spacing + a.rib_phase
    anterior = (v - 0.45 * au + 0.2 * au * au) / (a.rib_spacing * 1.25) + a.rib_phase * 0.7
    ribs = np.clip((np.cos(2 * math.pi * posterior) - 0.45) / 0.55, 0.0, 1.0) + 0.45 * np.clip(
        (np.cos(2 * math.pi * anterior) - 0.6) / 0.4, 0.0, 1.0
    )
    clav_y = a.lung_top + 0.1 + 0.22 * (au - 0.08) - 0.35 * (au - 0.3) ** 2
    clavicle = scene.ramp(0.028 - np.abs(v - clav_y), width=0.02) * scene.ramp(
        np.minimum(au - 0.07, 0.62 - au), width=0.04
    )

    # lung markings: vessels radiating from the hila, fading outwards
    markings = np.zeros(scene.shape, np.float32)
    for side in (-1, 1):
        hu, hv = side * 0.19, a.lung_top + 0.62
        r = np.hypot(u - hu, v - hv)
        theta = np.arctan2(v - hv, (u - hu) * side)
        markings += (np.cos(13 * theta + 5.0 * r + a.vessel_phase) > 0.55) * np.exp(-r / 0.32)

    image = 0.03 + body * a.tissue
    image += 0.07 * abdomen
    image -= a.lung_depth * visible
    image += 0.11 * heart * body + 0.09 * mediastinum * body
    image += 0.14 * spine * body
    image += 0.13 * ribs * cage * body + 0.17 * clavicle * body
    image += 0.05 * markings * visible

    lesion, mask = pattern.render(scene, rng, visible)
    image += lesion

    image = upsample(np.clip(image, 0.0, 1.0), shape) ** pose.gamma
    image = ndimage.gaussian_filter(image, sigma=pose.blur * shape[0] / 256.0, truncate=3.0)
    image += pose.noise * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(image, 0.0, 1.0, out=image)
    lung = upsample(visible, shape) > 0.5
    mask = upsample(mask.astype(np.float32), shape) > 0.5
    if pattern.mask_in_lung:
        mask &= lung
    return Rendered(image=image.astype(np.float32, copy=False), mask=mask, lung=lung)


def render_lateral(anatomy: Anatomy, rng: np.random.Generator, size: int) -> np.ndarray:
    """A crude lateral chest view (for the ``lateral_view`` corrupt case)."""
    shape = image_shape(size, anatomy)
    scene = Scene(anatomy, sample_pose(rng, "LL"), shape)
    u, v = scene.u, scene.v
    body = scene.ramp(scene.ellipse(0.0, 0.1, 0.7, 1.2, power=3.0), width=0.05)
    lung = scene.ramp(np.minimum(scene.ellipse(-0.05, -0.05, 0.42, 0.62, power=2.2), anatomy.dome + 0.1 - v))
    spine = scene.ramp(0.07 - np.abs(u - 0.52), width=0.02) * (0.8 + 0.2 * np.cos(v * 40))
    heart = scene.ramp(scene.ellipse(-0.22, anatomy.dome - 0.1, 0.24, 0.2), width=0.05)
    image = 0.03 + anatomy.tissue * body - 0.28 * lung * (1 - heart) + 0.15 * spine * body + 0.08 * heart
    image = ndimage.gaussian_filter(np.clip(image, 0, 1).astype(np.float32), sigma=shape[0] / 256.0)
    image += rng.normal(0.0, 0.01, size=shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def render_ct_slice(rng: np.random.Generator, size: int) -> np.ndarray:
    """An axial chest CT slice in Hounsfield units (int16), for the CT corrupt case."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    hu = np.full((size, size), -1000.0, np.float32)
    body = (x / 0.9) ** 2 + (y / 0.62) ** 2 < 1
    hu[body] = 40
    for side in (-1, 1):
        hu[((x - side * 0.4) / 0.3) ** 2 + (y / 0.42) ** 2 < 1] = -850
    hu[(x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1] = 700  # vertebra
    hu[((x - 0.05) / 0.2) ** 2 + ((y + 0.1) / 0.18) ** 2 < 1] = 45  # heart
    hu += rng.normal(0, 12, size=hu.shape).astype(np.float32)
    return np.round(hu).astype(np.int16)


def describe(anatomy: Anatomy) -> dict:
    """Patient-level parameters (for debugging and tests)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(anatomy).items()}


__all__ = [
    "Anatomy",
    "Pose",
    "Rendered",
    "Scene",
    "blob",
    "describe",
    "image_shape",
    "render_chest",
    "render_ct_slice",
    "render_lateral",
    "sample_anatomy",
    "sample_pose",
    "smooth_noise",
]

"""Procedural PA chest X-ray phantoms: the built-in data set that needs no download.

Each phantom is drawn from a few dozen random anatomical and exposure parameters and rendered with
vectorized numpy on coordinate grids. Shapes live in normalized coordinates (x to the image right,
y down, both in [-1, 1]), so the same seed gives the same patient at 32 px and at 256 px; only the
film grain is drawn per pixel.

Rendering follows the physics loosely: we build an attenuation map (soft tissue, bone, with the air
in the lungs subtracted) and expose it as ``1 - exp(-k * attenuation)``, so air is dark, bone and
the mediastinum are bright, and overlapping structures add up the way they do on film.

Class signal, as a radiologist would describe it:
- Normal: clear lungs.
- COVID-19: bilateral, peripheral, lower-zone ground-glass opacities (hazy patches through which
  the vessels stay visible) in both lungs.
- Non-COVID (bacterial pneumonia): one dense lobar consolidation in one lung, sharply bounded at a
  fissure, sometimes with air bronchograms.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medstylegan2.config import CLASS_NAMES
from medstylegan2.images import ImageSet, save_png

log = logging.getLogger(__name__)

NORMAL, COVID, NON_COVID = 0, 1, 2

# Edge softness of anatomical outlines in normalized units (about 1.5 px at 256 px): real organ
# borders on a radiograph are never perfectly sharp.
EDGE = 0.010
# Exposure constant: attenuation 1.0 (the full soft-tissue thickness) maps to ~80 % brightness.
EXPOSURE_K = 1.1
# Fraction of the soft-tissue attenuation that a fully aerated lung removes.
AIR_DEPTH = 0.74


# ----------------------------------------------------------------------------------------------
# Random parameters (all drawn before any pixel exists, so they do not depend on resolution)


@dataclass
class Lung:
    side: int  # -1: image left (patient's right), +1: image right (patient's left)
    center_x: float  # distance of the ellipse centre from the midline
    center_y: float
    half_width: float
    half_height: float
    medial_x: float  # medial border distance from the midline
    dome_y: float  # highest point of the hemidiaphragm under this lung
    dome_x: float  # distance of that point from the midline
    dome_curvature: float


@dataclass
class Segment:
    x0: float
    y0: float
    x1: float
    y1: float
    radius: float
    strength: float


@dataclass
class Blob:
    x: float
    y: float
    sigma_x: float
    sigma_y: float
    angle: float
    amplitude: float


@dataclass
class Consolidation:
    side: int
    lobe: str  # "upper", "middle" or "lower"
    fissure_y: float  # fissure height at the lung centre
    fissure_tilt: float  # slope dy/dx of the fissure, laterally
    envelope: Blob  # soft outer extent of the consolidation
    density: float
    bronchi: list[Segment] = field(default_factory=list)


@dataclass
class Anatomy:
    rotation: float
    shift_x: float
    shift_y: float
    zoom: float
    thorax_half_width: float
    shoulder_y: float
    shoulder_width: float
    breast: float  # extra soft tissue over the lower lung zones
    neck_half_width: float
    lungs: tuple[Lung, Lung]
    heart_x: float
    heart_y: float
    heart_half_width: float
    heart_half_height: float
    heart_angle: float
    atrium_x: float
    aortic_knob_radius: float
    carina_y: float
    trachea_x: float
    rib_top: float
    rib_spacing: float
    rib_spread: float  # relative growth of rib spacing per rib, caudally
    rib_curvature: float
    rib_thickness: float
    rib_strength: float
    rib_jitter: np.ndarray  # per-rib offsets: no two ribs are exactly parallel
    clavicle_y: float
    clavicle_tilt: float
    spine_half_width: float
    vertebra_height: float
    gastric_bubble: float  # 0 when absent, else its size
    hila: tuple[tuple[float, float], tuple[float, float]]
    vessels: list[list[np.ndarray]]  # per lung, per primary branch: segment arrays (see _segment_array)


@dataclass
class Exposure:
    gamma: float
    contrast: float
    brightness: float
    background: float
    blur_sigma: float  # normalized units
    grain: float
    heel: float  # anode heel effect: a gentle top-to-bottom exposure gradient


@dataclass
class Lesions:
    ground_glass: list[Blob] = field(default_factory=list)
    ground_glass_texture: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    consolidation: Consolidation | None = None


N_RIBS = 11


def _draw_lung(*, side: int, width: float, rng: np.random.Generator) -> Lung:
    # The right hemidiaphragm (image left) sits a little higher because the liver lies under it,
    # and the left lung is narrower because the heart takes its room.
    apex = rng.uniform(-0.76, -0.64)
    bottom = rng.uniform(0.74, 0.86)
    right = side < 0
    half_width = width * rng.uniform(0.33, 0.37) * (1.0 if right else 0.95)
    medial = rng.uniform(0.06, 0.10)
    return Lung(
        side=side,
        center_x=medial + half_width,
        center_y=(apex + bottom) / 2,
        half_width=half_width,
        half_height=(bottom - apex) / 2,
        medial_x=medial,
        dome_y=rng.uniform(0.30, 0.42) - (0.05 if right else 0.0),
        dome_x=medial + half_width * rng.uniform(0.6, 0.9),
        dome_curvature=rng.uniform(0.9, 1.5),
    )


def _grow_vessel_trees(*, side: int, hilum: tuple[float, float], rng: np.random.Generator,
                       branches: int = 5, depth: int = 3) -> list[np.ndarray]:
    """Pulmonary vessels fanning out of the hilum and forking as they thin towards the periphery.

    Returns one array of segments ``[x0, y0, x1, y1, radius, strength]`` per primary branch; a
    whole generation of forks is drawn at once, which keeps this cheap.
    """
    # Primary branches fan out laterally: upward to the apex, sideways, downward to the base.
    angle = np.linspace(-1.3, 1.4, branches) + rng.normal(0, 0.12, branches)
    length = rng.uniform(0.12, 0.18, branches)
    x0 = np.full(branches, hilum[0])
    y0 = np.full(branches, hilum[1])
    radius, strength = 0.022, 1.0
    generations = []
    for level in range(depth + 1):
        x1 = x0 + side * np.cos(angle) * length
        y1 = y0 + np.sin(angle) * length
        generations.append(np.stack([x0, y0, x1, y1, np.full_like(x0, radius), np.full_like(x0, strength)], axis=1))
        if level == depth:
            break
        # Every segment forks in two, one child turning each way; children come out as pairs.
        turn = np.repeat([[-1.0, 1.0]], len(angle), axis=0).ravel()
        angle = np.repeat(angle, 2) + turn * rng.uniform(0.2, 0.55, 2 * len(angle))
        length = np.repeat(length, 2) * rng.uniform(0.65, 0.85, 2 * len(length))
        x0, y0 = np.repeat(x1, 2), np.repeat(y1, 2)
        radius, strength = radius * 0.72, strength * 0.7
    # Generation g holds branches * 2**g segments; descendants of branch b are a contiguous run.
    trees = []
    for b in range(branches):
        trees.append(np.concatenate([g[b * 2 ** k:(b + 1) * 2 ** k] for k, g in enumerate(generations)]))
    return [t.astype(np.float32) for t in trees]


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """One random patient: body habitus, organ sizes, positioning."""
    width = rng.uniform(0.78, 0.9)
    lungs = (_draw_lung(side=-1, width=width, rng=rng), _draw_lung(side=1, width=width, rng=rng))
    hila = tuple((lung.side * (lung.medial_x + rng.uniform(0.07, 0.10)), rng.uniform(-0.14, -0.04))
                 for lung in lungs)
    vessels = [_grow_vessel_trees(side=lung.side, hilum=hilum, rng=rng) for lung, hilum in zip(lungs, hila)]
    heart_scale = rng.uniform(0.88, 1.15)
    return Anatomy(
        rotation=rng.normal(0, 0.035),
        shift_x=rng.uniform(-0.04, 0.04),
        shift_y=rng.uniform(-0.04, 0.06),
        zoom=rng.uniform(0.97, 1.07),
        thorax_half_width=width,
        shoulder_y=rng.uniform(-0.92, -0.82),
        shoulder_width=rng.uniform(0.18, 0.32),
        breast=rng.uniform(0.0, 0.1),
        neck_half_width=rng.uniform(0.20, 0.26),
        lungs=lungs,
        heart_x=rng.uniform(0.14, 0.20),
        heart_y=rng.uniform(0.22, 0.30),
        heart_half_width=0.27 * heart_scale,
        heart_half_height=0.20 * heart_scale,
        heart_angle=rng.uniform(0.3, 0.55),
        atrium_x=-rng.uniform(0.08, 0.13),
        aortic_knob_radius=rng.uniform(0.045, 0.065),
        carina_y=rng.uniform(-0.34, -0.24),
        trachea_x=rng.normal(0, 0.01),
        rib_top=rng.uniform(-0.80, -0.74),
        rib_spacing=rng.uniform(0.12, 0.145),
        rib_spread=rng.uniform(0.0, 0.03),
        rib_curvature=rng.uniform(0.45, 0.6),
        rib_thickness=rng.uniform(0.020, 0.026),
        rib_strength=rng.uniform(0.08, 0.13),
        rib_jitter=rng.normal(0, 0.012, N_RIBS).astype(np.float32),
        clavicle_y=rng.uniform(-0.62, -0.54),
        clavicle_tilt=rng.uniform(0.06, 0.16),
        spine_half_width=rng.uniform(0.055, 0.07),
        vertebra_height=rng.uniform(0.10, 0.12),
        gastric_bubble=rng.uniform(0.06, 0.10) if rng.random() < 0.6 else 0.0,
        hila=hila,
        vessels=vessels,
    )


def draw_exposure(rng: np.random.Generator) -> Exposure:
    """Film and technique: how hard the beam was, how the image was windowed, how noisy it is."""
    return Exposure(
        gamma=rng.uniform(0.8, 1.25),
        contrast=rng.uniform(0.85, 1.15),
        brightness=rng.uniform(-0.06, 0.06),
        background=rng.uniform(0.01, 0.07),
        blur_sigma=rng.uniform(0.002, 0.007),
        grain=rng.uniform(0.008, 0.025),
        heel=rng.uniform(-0.05, 0.05),
    )


def _lower_lateral_point(lung: Lung, rng: np.random.Generator) -> tuple[float, float]:
    """A point in the periphery of the lower two thirds of a lung (signed x, y)."""
    y = rng.uniform(-0.05, lung.dome_y + 0.05)
    # The outer third of the lung at that height: ground glass in COVID-19 hugs the pleura.
    rel = np.clip((y - lung.center_y) / lung.half_height, -0.95, 0.95)
    lateral = lung.center_x + lung.half_width * math.sqrt(1 - rel * rel)
    x = lateral - rng.uniform(0.03, 0.14)
    return lung.side * x, y


def draw_lesions(label: int, anatomy: Anatomy, rng: np.random.Generator) -> Lesions:
    if label == NORMAL:
        return Lesions()
    if label == COVID:
        blobs: list[Blob] = []
        for lung in anatomy.lungs:
            for _ in range(rng.integers(3, 6)):
                x, y = _lower_lateral_point(lung, rng)
                blobs.append(Blob(x=x, y=y, sigma_x=rng.uniform(0.06, 0.11), sigma_y=rng.uniform(0.08, 0.15),
                                  angle=rng.uniform(-0.4, 0.4), amplitude=rng.uniform(0.36, 0.56)))
        # A few random plane waves give ground glass its patchy, mottled look without pixel noise.
        freqs = rng.uniform(6, 14, size=5)
        angles = rng.uniform(0, math.pi, size=5)
        phases = rng.uniform(0, 2 * math.pi, size=5)
        return Lesions(ground_glass=blobs, ground_glass_texture=(freqs, angles, phases))
    if label == NON_COVID:
        return Lesions(consolidation=_draw_consolidation(anatomy, rng))
    raise ValueError(f"label must be one of 0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)}), got {label}")


def _draw_consolidation(anatomy: Anatomy, rng: np.random.Generator) -> Consolidation:
    lung = anatomy.lungs[int(rng.integers(0, 2))]
    # The middle lobe exists only on the patient's right; the lingula plays its part on the left
    # but hides behind the heart, so we leave it out.
    lobes = ["upper", "middle", "lower"] if lung.side < 0 else ["upper", "lower"]
    lobe = str(rng.choice(lobes, p=[0.3, 0.25, 0.45] if lung.side < 0 else [0.4, 0.6]))
    if lobe == "upper":
        fissure_y, ex_y = rng.uniform(-0.20, -0.05), rng.uniform(-0.45, -0.30)
    elif lobe == "middle":
        fissure_y, ex_y = rng.uniform(-0.15, -0.02), rng.uniform(0.10, 0.25)
    else:
        fissure_y, ex_y = rng.uniform(-0.05, 0.12), rng.uniform(0.20, 0.35)
    ex_x = lung.side * (lung.center_x + rng.uniform(-0.05, 0.08))
    envelope = Blob(x=ex_x, y=ex_y, sigma_x=rng.uniform(0.20, 0.28), sigma_y=rng.uniform(0.20, 0.30),
                    angle=rng.uniform(-0.3, 0.3), amplitude=1.0)
    bronchi: list[Segment] = []
    if rng.random() < 0.7:
        # Air bronchograms: airways stay dark inside alveoli full of exudate. One trunk enters
        # the consolidation from the hilar side and forks once.
        x0 = lung.side * (lung.medial_x + rng.uniform(0.08, 0.14))
        y0 = fissure_y + (0.06 if lobe != "upper" else -0.06)
        angle = rng.uniform(0.1, 0.7) if lobe != "upper" else rng.uniform(-0.9, -0.3)
        length = rng.uniform(0.10, 0.16)
        x1, y1 = x0 + lung.side * math.cos(angle) * length, y0 + math.sin(angle) * length
        bronchi.append(Segment(x0, y0, x1, y1, radius=0.011, strength=0.5))
        spread = rng.uniform(0.3, 0.6)
        for sign in (1, -1):
            child = angle + sign * spread
            x2 = x1 + lung.side * math.cos(child) * length * 0.8
            y2 = y1 + math.sin(child) * length * 0.8
            bronchi.append(Segment(x1, y1, x2, y2, radius=0.008, strength=0.4))
    return Consolidation(side=lung.side, lobe=lobe, fissure_y=fissure_y, fissure_tilt=rng.uniform(-0.25, 0.25),
                         envelope=envelope, density=rng.uniform(0.8, 0.95), bronchi=bronchi)


# ----------------------------------------------------------------------------------------------
# Shape primitives on coordinate grids


def _soft_inside(distance: np.ndarray, *, softness: float) -> np.ndarray:
    """~1 where distance > 0 (inside), ~0 outside, with a tanh ramp of the given width."""
    return 0.5 + 0.5 * np.tanh(distance / softness)


def _ellipse_distance(x: np.ndarray, y: np.ndarray, *, cx: float, cy: float, ax: float, ay: float,
                      angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance to an ellipse's outline, positive inside.

    First-order: (1 - r) / |grad r| with r the normalized radius; exact on the outline, which is
    all a soft edge needs.
    """
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    u, v = dx / ax, dy / ay
    r = np.sqrt(u * u + v * v) + 1e-6
    grad = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) / r + 1e-6
    return (1.0 - r) / grad


def _gaussian_blob(x: np.ndarray, y: np.ndarray, blob: Blob) -> np.ndarray:
    dx, dy = x - blob.x, y - blob.y
    c, s = math.cos(blob.angle), math.sin(blob.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return blob.amplitude * np.exp(-0.5 * ((u / blob.sigma_x) ** 2 + (v / blob.sigma_y) ** 2))


def _segment_array(segments: list[Segment]) -> np.ndarray:
    """Segments as rows ``[x0, y0, x1, y1, radius, strength]``, the form the renderer uses."""
    return np.array([[s.x0, s.y0, s.x1, s.y1, s.radius, s.strength] for s in segments],
                    dtype=np.float32).reshape(-1, 6)


def _segments_profile(x: np.ndarray, y: np.ndarray, segments: np.ndarray | list[Segment], *,
                      min_radius: float = 0.0) -> np.ndarray:
    """Sum of soft tubes with a gaussian cross-section along line segments, all at once.

    Tubes thinner than ``min_radius`` (about a pixel) are widened and dimmed by the same factor,
    which keeps their total brightness and stops them from flickering between pixels.
    """
    seg = segments if isinstance(segments, np.ndarray) else _segment_array(segments)
    if len(seg) == 0 or x.size == 0:
        return np.zeros_like(x)
    x0, y0, x1, y1, radius, strength = (seg[:, i, None] for i in range(6))
    ex, ey = x1 - x0, y1 - y0
    inv_len2 = 1.0 / (ex * ex + ey * ey + 1e-9)
    wide2 = radius * radius + min_radius * min_radius
    peak = strength * radius / np.sqrt(wide2)
    rx, ry = x.reshape(1, -1) - x0, y.reshape(1, -1) - y0
    t = np.clip((rx * ex + ry * ey) * inv_len2, 0.0, 1.0)
    dx, dy = rx - t * ex, ry - t * ey
    tubes = peak * np.exp(-(dx * dx + dy * dy) / wide2)
    return tubes.sum(axis=0).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Anatomy rendering: attenuation maps


@dataclass
class _Maps:
    tissue: np.ndarray  # soft tissue + bone attenuation, with no air removed
    air: np.ndarray  # attenuation that the aerated lungs remove (>= 0)
    lungs: np.ndarray  # where the lungs are, in [0, 1], including behind the heart
    fields: np.ndarray  # the lung fields seen on film: lungs not hidden by heart or aorta


def _body(x: np.ndarray, y: np.ndarray, a: Anatomy, soft: float) -> np.ndarray:
    """Soft-tissue thickness: barrel-shaped thorax, sloping shoulders, neck on top."""
    ax = np.abs(x)
    # The chest is widest at the lower ribs and narrows towards the apices; above the axillae
    # the shoulders flare out towards the edges of the film.
    barrel = a.thorax_half_width * (1.0 - 0.16 * (y - 0.35) ** 2)
    flare = a.shoulder_width * _soft_inside(-0.5 - y, softness=0.14)
    half_width = barrel + flare
    shoulder_top = a.shoulder_y + 0.75 * np.clip(ax - a.neck_half_width, 0, None) ** 2
    thorax = (_soft_inside(half_width - ax, softness=soft * 2)
              * _soft_inside(y - shoulder_top, softness=soft * 2))
    neck = _soft_inside(a.neck_half_width - ax, softness=soft * 2)
    inside = 1.0 - (1.0 - thorax) * (1.0 - neck)
    rel = np.clip(ax / np.maximum(half_width, 0.05), 0, 1.2)
    profile = np.clip(1.0 - rel ** 4, 0, 1) ** 0.35
    # Breasts and pectoral muscles overlie the lower lateral lung zones symmetrically.
    breasts = a.breast * np.exp(-0.5 * (((ax - 0.5 * a.thorax_half_width) / 0.22) ** 2 + ((y - 0.35) / 0.2) ** 2))
    return inside * (0.45 + 0.55 * profile + breasts)


def _lung_mask(x: np.ndarray, y: np.ndarray, lung: Lung, soft: float) -> np.ndarray:
    xs = lung.side * x  # lateral is positive for both lungs
    # Lungs are egg-shaped, narrow at the apex and widest at the bases: widen the ellipse
    # progressively downwards.
    taper = 1.0 + 0.18 * np.clip((y - lung.center_y) / lung.half_height, -1, 1)
    ellipse = _ellipse_distance(lung.center_x + (xs - lung.center_x) / taper, y, cx=lung.center_x,
                                cy=lung.center_y, ax=lung.half_width, ay=lung.half_height)
    dome = lung.dome_y + lung.dome_curvature * (xs - lung.dome_x) ** 2
    # The mediastinum widens caudally, so the medial borders diverge towards the bases.
    medial = xs - lung.medial_x - 0.05 * np.clip(y + 0.5, 0, None)
    return (_soft_inside(ellipse, softness=soft) * _soft_inside(dome - y, softness=soft)
            * _soft_inside(medial, softness=soft))


def _dome_y(lung: Lung, x: np.ndarray | float) -> np.ndarray | float:
    return lung.dome_y + lung.dome_curvature * (lung.side * x - lung.dome_x) ** 2


def _ribs(x: np.ndarray, y: np.ndarray, a: Anatomy, soft: float) -> np.ndarray:
    """Posterior ribs as arcs from the spine outwards and down, plus fainter anterior ribs.

    All ribs of a kind are evaluated at once on a [rib, pixel] array.
    """
    u = ((np.abs(x) - a.spine_half_width) / a.thorax_half_width).reshape(1, -1)  # 0: spine, 1: chest wall
    py = y.reshape(1, -1)
    i = np.arange(N_RIBS, dtype=np.float32)[:, None]
    # Lower ribs sit progressively further apart, are flatter and less tightly curved.
    tops = a.rib_top + a.rib_spacing * (i + a.rib_spread * i * (i - 1) / 2) + a.rib_jitter[:, None]
    curvature = a.rib_curvature * (1.5 - 0.07 * i)
    d = np.abs(py - (tops - 0.32 * u + curvature * u * u))
    half = a.rib_thickness * (0.75 + 0.6 * u)
    band = _soft_inside(half - d, softness=soft)
    # Cortical bone at the rib margins is denser than the marrow between them.
    cortex = np.exp(-(((d - half) / (0.4 * half)) ** 2))
    posterior = (0.7 * band + 0.35 * cortex).sum(axis=0)

    # Anterior ribs run from the chest wall medially and downward to the costal cartilage.
    j = np.arange(6, dtype=np.float32)[:, None]
    fronts = a.rib_top + 0.18 + a.rib_spacing * 1.3 * j
    d = np.abs(py - (fronts + 0.34 * np.clip(1.0 - u, 0, None) ** 1.2))
    anterior = _soft_inside(a.rib_thickness * 1.1 - d, softness=soft * 2).sum(axis=0)
    anterior *= 0.45 * _soft_inside(u[0] - 0.3, softness=0.06)

    inside = _soft_inside(u[0], softness=0.03) * _soft_inside(1.0 - u[0], softness=0.03)
    # Below the diaphragm the thick abdomen swamps the ribs' contrast.
    base = max(a.lungs[0].dome_y, a.lungs[1].dome_y) + 0.25
    fade = _soft_inside(base - py[0], softness=0.08)
    return ((posterior + anterior) * inside * fade * a.rib_strength).reshape(x.shape)


def _clavicles(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    segs: list[Segment] = []
    for side in (-1, 1):
        # Medial end at the sternal notch, lateral end up at the shoulder, with a gentle S.
        pts = [(0.07, a.clavicle_y + 0.04), (0.25, a.clavicle_y - 0.01), (0.48, a.clavicle_y - 0.3 * a.clavicle_tilt),
               (0.70, a.clavicle_y - a.clavicle_tilt)]
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
            segs.append(Segment(side * xa, ya, side * xb, yb, radius=0.042, strength=1.0))
    # Only rows near the clavicles can be touched: evaluate the tubes there alone.
    rows = (y > a.clavicle_y - a.clavicle_tilt - 0.15) & (y < a.clavicle_y + 0.15)
    prof = np.zeros_like(x)
    prof[rows] = _segments_profile(x[rows], y[rows], segs)
    # A flat-topped tube: threshold the summed gaussians, so joints between pieces do not glow.
    shaft = _soft_inside(prof - 0.45, softness=0.12)
    cortex = np.exp(-(((prof - 0.45) / 0.15) ** 2))
    return 0.22 * shaft + 0.10 * cortex


def _spine(x: np.ndarray, y: np.ndarray, a: Anatomy, soft: float) -> np.ndarray:
    column = _soft_inside(a.spine_half_width - np.abs(x), softness=soft * 1.5)
    # Vertebral bodies separated by less dense discs; pedicles as paired ovals.
    phase = (y - a.rib_top) / a.vertebra_height
    disc = np.exp(-(((phase - np.round(phase)) / 0.12) ** 2))
    pedicle_y = np.round(phase) * a.vertebra_height + a.rib_top + 0.4 * a.vertebra_height
    pedicles = np.exp(-(((np.abs(x) - a.spine_half_width * 0.7) / 0.014) ** 2) - ((y - pedicle_y) / 0.022) ** 2)
    return column * (0.16 - 0.06 * disc) + 0.08 * pedicles * column


def _heart(x: np.ndarray, y: np.ndarray, a: Anatomy, soft: float) -> np.ndarray:
    """Left ventricle bulging into the left lung base, right atrium just right of the spine."""
    ventricle = _ellipse_distance(x, y, cx=a.heart_x, cy=a.heart_y, ax=a.heart_half_width,
                                  ay=a.heart_half_height, angle=a.heart_angle)
    atrium = _ellipse_distance(x, y, cx=a.atrium_x + 0.05, cy=a.heart_y + 0.02, ax=0.12,
                               ay=a.heart_half_height * 0.95)
    # Great vessels and the pericardial fat fill the gap up to the mediastinum.
    pedicle = _ellipse_distance(x, y, cx=0.02, cy=a.heart_y - 0.12, ax=0.14, ay=0.18)
    return _soft_inside(np.maximum(np.maximum(ventricle, atrium), pedicle), softness=soft * 1.5)


def _vessels(x: np.ndarray, y: np.ndarray, a: Anatomy, *, lungs: np.ndarray, min_radius: float) -> np.ndarray:
    """Attenuation of the pulmonary vessel trees, inside the lungs only."""
    total = np.zeros_like(x)
    # Vessels show only against air, and each branch stays near its own bounding box: evaluating
    # a branch on just those lung pixels cuts the work about tenfold.
    in_lung = lungs > 0.01
    for lung, trees in zip(a.lungs, a.vessels):
        for tree in trees:
            margin = 3.0 * math.sqrt(float(tree[:, 4].max()) ** 2 + min_radius ** 2)
            xs, ys = tree[:, [0, 2]], tree[:, [1, 3]]
            where = (in_lung & (x > xs.min() - margin) & (x < xs.max() + margin)
                     & (y > ys.min() - margin) & (y < ys.max() + margin))
            total[where] += _segments_profile(x[where], y[where], tree, min_radius=min_radius)
    # Overlapping branches near the hilum saturate instead of summing into bright knots.
    return 0.16 * (1.0 - np.exp(-total))


def _anatomy_maps(x: np.ndarray, y: np.ndarray, a: Anatomy, *, soft: float) -> _Maps:
    body = _body(x, y, a, soft)
    lungs = np.maximum(_lung_mask(x, y, a.lungs[0], soft), _lung_mask(x, y, a.lungs[1], soft))
    heart = _heart(x, y, a, soft)
    knob = _soft_inside(_ellipse_distance(x, y, cx=0.08 + a.aortic_knob_radius, cy=-0.34,
                                          ax=a.aortic_knob_radius, ay=a.aortic_knob_radius * 1.1),
                        softness=soft * 1.5)
    # Air thickness is largest in the middle of each lung and thins towards the pleura.
    depth = 0.7 + 0.3 * _soft_inside(lungs - 0.5, softness=0.3)
    aerated = lungs * depth * (1.0 - 0.9 * heart) * (1.0 - knob)
    if a.gastric_bubble:
        left = a.lungs[1]
        bx = left.dome_x + 0.05
        top = float(_dome_y(left, bx)) + 0.05
        bubble = _soft_inside(_ellipse_distance(x, y, cx=bx, cy=top + a.gastric_bubble * 0.8,
                                                ax=a.gastric_bubble * 1.6, ay=a.gastric_bubble * 0.8),
                              softness=soft * 3)
        aerated = np.maximum(aerated, bubble * 0.25)
    trachea = (_soft_inside(0.028 - np.abs(x - a.trachea_x), softness=soft * 1.5)
               * _soft_inside(a.carina_y - y, softness=soft))
    bronchi = _segments_profile(x, y, [
        Segment(a.trachea_x, a.carina_y, -0.16, a.carina_y + 0.15, radius=0.022, strength=1.0),
        Segment(a.trachea_x, a.carina_y, 0.16, a.carina_y + 0.19, radius=0.020, strength=1.0)])
    airway = np.maximum(trachea, np.clip(bronchi, 0, 1)) * 0.3
    bone = _ribs(x, y, a, soft) + _clavicles(x, y, a) + _spine(x, y, a, soft)
    # Bone needs a body around it; heart and mediastinum add a little thickness of their own.
    tissue = body * (1.0 + 0.15 * heart) + bone * _soft_inside(body - 0.2, softness=0.1)
    air = body * AIR_DEPTH * np.maximum(aerated, airway)
    return _Maps(tissue=tissue, air=air, lungs=lungs, fields=lungs * (1.0 - heart) * (1.0 - knob))


def _lesion_opacity(x: np.ndarray, y: np.ndarray, lesions: Lesions, a: Anatomy, soft: float) -> np.ndarray:
    """How much of the lung air each pixel loses to fluid or exudate, in [0, 1]."""
    opacity = np.zeros_like(x)
    if lesions.ground_glass:
        haze = np.zeros_like(x)
        for blob in lesions.ground_glass:
            haze = 1.0 - (1.0 - haze) * (1.0 - _gaussian_blob(x, y, blob))
        freqs, angles, phases = lesions.ground_glass_texture
        mottle = np.zeros_like(x)
        for f, ang, ph in zip(freqs, angles, phases):
            mottle += np.cos(f * (x * math.cos(ang) + y * math.sin(ang)) + ph)
        opacity = haze * (0.75 + 0.25 * mottle / math.sqrt(len(freqs)))
    if lesions.consolidation is not None:
        c = lesions.consolidation
        lung = a.lungs[0] if c.side < 0 else a.lungs[1]
        xs = c.side * x
        fissure = c.fissure_y + c.fissure_tilt * (xs - lung.center_x)
        # The fissure (pleura between lobes) is where consolidation stops sharply.
        if c.lobe == "upper":
            lobe = _soft_inside(fissure - y, softness=soft)
        elif c.lobe == "middle":
            lobe = _soft_inside(y - fissure, softness=soft) * _soft_inside(0.5 - y, softness=0.08)
        else:
            lobe = _soft_inside(y - fissure, softness=soft)
        side = _soft_inside(xs - 0.02, softness=soft)
        envelope = _gaussian_blob(x, y, c.envelope)
        extent = _soft_inside(envelope - 0.3, softness=0.08)
        # Exudate fills acini unevenly: a faint, fine mottle inside the dense region.
        grain = 0.93 + 0.07 * np.cos(23.0 * x + 3.0 * np.sin(17.0 * y)) * np.cos(19.0 * y)
        dense = c.density * lobe * side * extent * grain
        if c.bronchi:
            dense *= 1.0 - np.clip(_segments_profile(x, y, c.bronchi), 0, 0.7)
        opacity = 1.0 - (1.0 - opacity) * (1.0 - dense)
    return np.clip(opacity, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Exposure


def _gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable gaussian blur by shifted sums over an edge-padded copy.

    Kernels here are a few pixels wide, where shifted sums beat FFTs, and they avoid BLAS, whose
    threads slow small products a hundredfold on a busy two-core machine.
    """
    if sigma_px < 0.05:
        return image
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = image.shape
    padded = np.pad(image, radius, mode="edge")
    rows = sum(t * padded[:, i:i + w] for i, t in enumerate(taps))
    return sum(t * rows[i:i + h, :] for i, t in enumerate(taps))


@dataclass
class Phantom:
    """A rendered phantom and the ground truth behind it (for tests and figures)."""

    image: np.ndarray  # uint8 [H, W]
    lungs: np.ndarray  # float32 [H, W] in [0, 1]: lung fields as seen on film (not behind the heart)
    lesion: np.ndarray  # float32 [H, W] in [0, 1]: air lost to disease inside the lungs
    label: int


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    return np.meshgrid(coords, coords, indexing="xy")


def _patient_coordinates(x: np.ndarray, y: np.ndarray, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates -> the patient's own frame (undoing rotation, shift and zoom)."""
    c, s = math.cos(a.rotation), math.sin(a.rotation)
    dx, dy = (x - a.shift_x) / a.zoom, (y - a.shift_y) / a.zoom
    return c * dx + s * dy, -s * dx + c * dy


def render_phantom(label: int, resolution: int, rng: np.random.Generator) -> Phantom:
    """Draw one random patient of class ``label`` and expose it at ``resolution`` x ``resolution``."""
    if label not in range(len(CLASS_NAMES)):
        raise ValueError(f"label must be one of 0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)}), got {label}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    # Disease is drawn last: the same generator state then gives the same patient on the same
    # film whatever the class, which makes counterfactual pairs (and tests) possible.
    anatomy = draw_anatomy(rng)
    exposure = draw_exposure(rng)
    lesions = draw_lesions(label, anatomy, rng)

    # Edges ramp over about a pixel: the tanh ramp then approximates each pixel's area coverage,
    # which anti-aliases as well as supersampling at a quarter of the cost.
    soft = max(EDGE, 0.5 * 2.0 / resolution)
    x, y = _patient_coordinates(*_grid(resolution), anatomy)
    maps = _anatomy_maps(x, y, anatomy, soft=soft)
    opacity = _lesion_opacity(x, y, lesions, anatomy, soft) * maps.lungs
    vessels = _vessels(x, y, anatomy, lungs=maps.lungs, min_radius=0.7 * 2.0 / resolution)
    # Hilar shadows: pulmonary arteries and lymph nodes bunch up where the vessels enter the lungs.
    hila = sum(_gaussian_blob(x, y, Blob(x=hx, y=hy, sigma_x=0.05, sigma_y=0.09, angle=0.0, amplitude=0.10))
               for hx, hy in anatomy.hila)
    attenuation = maps.tissue - maps.air * (1.0 - opacity) + (vessels + hila) * maps.lungs
    image = _expose(attenuation, exposure, resolution=resolution, y=y, rng=rng)
    return Phantom(image=image, lungs=maps.fields, lesion=opacity, label=label)


def _expose(attenuation: np.ndarray, e: Exposure, *, resolution: int, y: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    film = (1.0 - np.exp(-EXPOSURE_K * attenuation * (1.0 + e.heel * y))) / (1.0 - math.exp(-EXPOSURE_K * 1.7))
    film = e.background + (1.0 - e.background) * np.clip(film, 0, 1)
    film = np.clip(0.5 + e.contrast * (film - 0.5) + e.brightness, 0, 1) ** e.gamma
    film = _gaussian_blur(film, e.blur_sigma * resolution / 2)
    # Grain is drawn last so that everything above is identical across resolutions for a seed.
    noise = rng.standard_normal(film.shape).astype(np.float32)
    film = film + e.grain * 1.6 * _gaussian_blur(noise, 0.5)
    return np.clip(np.round(film * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Public API


def make_phantom(label: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One phantom of class ``label`` as uint8 [resolution, resolution]."""
    return render_phantom(label, resolution, rng).image


def phantom_rng(seed: int, label: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of class ``label``: independent of every other image."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(label, index)))


def generate_phantoms(per_class: int, resolution: int, seed: int = 0) -> ImageSet:
    """``per_class`` phantoms of every class, in class order; identical for identical arguments."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    n_classes = len(CLASS_NAMES)
    images = np.empty((per_class * n_classes, 1, resolution, resolution), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    sources = []
    for i, label in enumerate(labels.tolist()):
        index = i % per_class
        images[i, 0] = make_phantom(label, resolution, phantom_rng(seed, label, index))
        sources.append(_source_name(seed, label, index))
    return ImageSet(images=images, labels=labels, sources=sources)


def _source_name(seed: int, label: int, index: int) -> str:
    return f"phantom:seed={seed}:class={label}:index={index}"


def write_phantom_folder(out_dir: str | Path, per_class: int = 100, resolution: int = 64,
                         seed: int = 0) -> dict[str, int]:
    """Write ``out_dir/<class name>/<class name>_NNNNN.png``; returns the count per class.

    The images equal ``generate_phantoms(per_class, resolution, seed)``; they are written one at a
    time, so large sets never have to fit in memory.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for label, name in enumerate(CLASS_NAMES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = make_phantom(label, resolution, phantom_rng(seed, label, index))
            save_png(image, folder / f"{name}_{index:05d}.png")
        counts[name] = per_class
        log.debug("wrote %d %s phantoms to %s", per_class, name, folder)
    return counts


# ----------------------------------------------------------------------------------------------
# CLI

COMMAND_HELP = "write procedural chest X-ray phantoms as DIR/<class>/*.png (the built-in data set)"


def _int_at_least(text: str, minimum: int, unit: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}{unit}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _resolution(text: str) -> int:
    return _int_at_least(text, 8, " pixels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--per-class", type=_positive_int, default=100, help="images per class (default 100)")
    parser.add_argument("--resolution", type=_resolution, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="random seed >= 0 (default 0); the same seed gives the same images")


def run(args: argparse.Namespace) -> int:
    counts = write_phantom_folder(args.out, per_class=args.per_class, resolution=args.resolution, seed=args.seed)
    for name, count in counts.items():
        print(f"{count:6d} x {args.resolution}px  {name:<10s} -> {Path(args.out) / name}")
    print(f"wrote {sum(counts.values())} phantom images to {args.out}")
    return 0

"""Procedural road scenes: a small 3-D street world rendered by a pinhole camera (numpy + OpenCV).

The world is laid out in road coordinates (X right, Y up, Z forward, metres); the camera sits at
X=0, Y=cam_height, Z=cam_z and looks down +Z. Everything is painted through a depth buffer, so
the same world renders any frame of a forward drive (`bag.py`) or one still (`dataset.py`).

Shape families, kept disjoint on purpose (see `negatives.py`):
- inliers: convex polygons, ellipses and circle unions (cars, people, poles, signs, trees, clutter,
  facades, fences, hedges);
- test anomalies (raw id 14): non-convex families only -- stars, rings and C-rings, crescents,
  spiky radial Fourier blobs and rotated crosses -- textured with materials drawn from the inlier
  classes' colour/texture distributions, so colour alone does not give them away.
"""

from dataclasses import dataclass, field

import cv2
import numpy as np

from anomaly_seg_node.labels import RAW_ANOMALY_ID

# raw StreetHazards ids used by the painter (anomaly_seg_node/labels.py holds the names).
UNLABELED, BUILDING, FENCE, OTHER, PEDESTRIAN, POLE = 1, 2, 3, 4, 5, 6
ROAD_LINE, ROAD, SIDEWALK, VEGETATION, CAR, WALL, SIGN = 7, 8, 9, 10, 11, 12, 13
ANOMALY = RAW_ANOMALY_ID

ANOMALY_FAMILIES = ('star', 'ring', 'crescent', 'spiky', 'cross')
ANOMALY_AREA_RANGE = (0.0005, 0.10)  # share of the image per anomaly, drawn log-uniformly
NEAR = 0.8  # metres; nothing closer than this is drawn
TILE = 128  # side of the world-anchored noise tiles
TEXELS_PER_M = 9.0


@dataclass
class Camera:
    """A pinhole camera on the road: focal length and horizon in pixels, height in metres."""

    height: int
    width: int
    focal: float
    horizon: float
    vx: float  # column of the vanishing point; off-centre = yaw
    cam_height: float
    z: float = 0.0

    def column(self, x: float, z: float) -> float:
        return self.vx + self.focal * x / z

    def row(self, y: float, z: float) -> float:
        return self.horizon + self.focal * (self.cam_height - y) / z

    def intrinsics(self) -> np.ndarray:
        """3x3 K with the principal point where the renderer puts the optical axis."""
        return np.array([[self.focal, 0.0, self.vx], [0.0, self.focal, self.horizon],
                         [0.0, 0.0, 1.0]])


@dataclass
class Material:
    colour: np.ndarray  # (3,) RGB mean, 0..255
    amp: float  # low-frequency texture amplitude
    grain: float  # high-frequency texture amplitude


@dataclass
class Plane:
    """A vertical plane parallel to the road at lateral position x (facade, wall, fence, hedge)."""

    label: int
    x: float
    z0: float
    z1: float
    y0: float
    y1: float
    material: Material
    pattern: str = 'solid'  # solid | windows | fence | hedge
    alt: Material | None = None
    seed: int = 0


@dataclass
class Prim:
    pts: np.ndarray  # (N, 2) local metres: u right, v up, origin at the base centre
    label: int  # 0 erases what earlier primitives of the same sprite drew
    material: Material | None = None


@dataclass
class Sprite:
    """A flat object facing the camera, standing on the ground at (x, z)."""

    x: float
    z: float
    prims: list[Prim]
    seed: int = 0
    shadow: tuple[float, float, float] | None = None  # (half width, length, darkness) on ground


@dataclass
class World:
    road: tuple[float, float]  # left and right road edge X
    lanes: int
    walks: tuple[float, float]  # sidewalk widths left, right
    verge_label: tuple[int, int]
    mats: dict[str, Material]
    line_yellow: bool
    edge_lines: bool
    crosswalk: float | None
    sky: tuple[np.ndarray, np.ndarray]
    light: dict[str, float]
    tiles: np.ndarray  # (3, TILE, TILE) float32 unit noise
    planes: list[Plane] = field(default_factory=list)
    sprites: list[Sprite] = field(default_factory=list)


# --------------------------------------------------------------------------- materials

_BUILDING_BASES = ((150, 120, 100), (190, 180, 160), (120, 120, 125), (165, 85, 65),
                   (210, 205, 190), (95, 100, 112), (175, 150, 115))
_CAR_PAINTS = ((220, 220, 225), (28, 28, 32), (160, 162, 168), (170, 30, 32), (32, 52, 140),
               (42, 82, 52), (110, 110, 116), (200, 170, 60))
_SKIN = ((224, 172, 140), (198, 134, 100), (141, 85, 60), (90, 60, 45))
_SIGN = ((200, 30, 30), (30, 70, 170), (230, 200, 40), (230, 230, 230))
_CLUTTER = ((160, 120, 80), (40, 90, 60), (90, 90, 95), (220, 110, 30), (120, 80, 50))

# classes whose colour/texture distributions the anomalies borrow, weighted roughly like the
# inlier pixel mix so that no hue is more typical of anomalies than of the scene around them
ANOMALY_MATERIAL_SOURCES: dict[str, float] = {
    'road': 0.2, 'sidewalk': 0.15, 'building': 0.15, 'wall': 0.1, 'car': 0.1,
    'vegetation': 0.08, 'pole': 0.05, 'fence': 0.05, 'terrain': 0.04, 'other': 0.04,
    'clothes': 0.02, 'trunk': 0.02}


def sample_material(rng: np.random.Generator, kind: str) -> Material:
    """Draw one material of an inlier kind (the anomalies reuse this very function)."""
    u = rng.uniform
    if kind == 'road':
        g = u(60, 115)
        return Material(np.array([g + u(-5, 5), g + u(-5, 5), g + u(-3, 8)]), 9, 6)
    if kind == 'line':
        if rng.random() < 0.8:
            return Material(np.full(3, u(185, 235)), 8, 5)
        return Material(np.array([220.0, 190.0, 70.0]) * u(0.85, 1.05), 8, 5)
    if kind == 'sidewalk':
        g = u(110, 175)
        return Material(np.array([g + u(0, 15), g + u(-3, 8), g - u(0, 12)]), 11, 7)
    if kind == 'building':
        base = np.array(_BUILDING_BASES[rng.integers(len(_BUILDING_BASES))], float)
        return Material(base + rng.uniform(-20, 20, 3), 13, 7)
    if kind == 'glass':
        return Material(np.full(3, u(30, 85)) * np.array([0.9, 1.0, 1.15]), 18, 5)
    if kind == 'wall':
        if rng.random() < 0.3:
            return sample_material(rng, 'building')
        g = u(115, 180)
        return Material(np.array([g, g - u(0, 8), g - u(0, 15)]), 14, 8)
    if kind == 'fence':
        bases = ((60, 62, 66), (50, 80, 60), (125, 92, 62), (150, 150, 155))
        return Material(np.array(bases[rng.integers(4)], float) + rng.uniform(-12, 12, 3), 8, 5)
    if kind == 'vegetation':
        return Material(np.array([u(30, 85), u(70, 140), u(20, 60)]), 24, 14)
    if kind == 'trunk':
        return Material(np.array([u(60, 100), u(45, 70), u(30, 50)]), 10, 8)
    if kind == 'car':
        base = np.array(_CAR_PAINTS[rng.integers(len(_CAR_PAINTS))], float)
        return Material(np.clip(base + rng.uniform(-15, 15, 3), 0, 255), 6, 4)
    if kind == 'tyre':
        return Material(np.full(3, u(18, 36)), 4, 4)
    if kind == 'lamp':
        return Material(np.array([u(170, 230), u(20, 60), u(20, 50)]), 6, 4)
    if kind == 'clothes':
        c = rng.uniform(25, 200, 3)
        return Material(0.6 * c + 0.4 * c.mean(), 10, 8)
    if kind == 'skin':
        return Material(np.array(_SKIN[rng.integers(len(_SKIN))], float) * u(0.9, 1.1), 6, 4)
    if kind == 'pole':
        return Material(np.full(3, u(80, 150)) + rng.uniform(-6, 6, 3), 6, 4)
    if kind == 'sign':
        return Material(np.array(_SIGN[rng.integers(len(_SIGN))], float) * u(0.85, 1.05), 5, 4)
    if kind == 'other':
        base = np.array(_CLUTTER[rng.integers(len(_CLUTTER))], float)
        return Material(base + rng.uniform(-15, 15, 3), 10, 6)
    if kind == 'terrain':
        bases = ((120, 100, 75), (95, 110, 62), (135, 120, 95))
        return Material(np.array(bases[rng.integers(3)], float) + rng.uniform(-12, 12, 3), 16, 10)
    raise ValueError(f'unknown material kind {kind!r}')


def _noise_tiles(rng: np.random.Generator) -> np.ndarray:
    """Three unit-variance noise tiles: coarse, medium, fine (3, TILE, TILE)."""
    # periodic by construction (low-passed white noise in the Fourier domain): no seams on wrap
    freq = np.fft.fftfreq(TILE)
    radius = np.hypot(freq[:, None], freq[None, :])
    tiles = []
    for cutoff in (1.5 / TILE, 5.0 / TILE, 24.0 / TILE):
        spectrum = np.fft.fft2(rng.standard_normal((TILE, TILE))) * np.exp(-(radius / cutoff) ** 2)
        tile = np.real(np.fft.ifft2(spectrum)).astype(np.float32)
        tiles.append((tile - tile.mean()) / (tile.std() + 1e-6))
    return np.stack(tiles)


# --------------------------------------------------------------------------- shapes (local metres)

def _box(w: float, h: float, v0: float = 0.0, u0: float = 0.0) -> np.ndarray:
    a, b = u0 - w / 2, u0 + w / 2
    return np.array([[a, v0], [b, v0], [b, v0 + h], [a, v0 + h]])


def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], 1)


def _car(rng: np.random.Generator, front: bool) -> tuple[list[Prim], float, float]:
    w, h = rng.uniform(1.65, 1.95), rng.uniform(1.35, 1.6)
    paint, glass, tyre = (sample_material(rng, k) for k in ('car', 'glass', 'tyre'))
    lamp = sample_material(rng, 'lamp')
    if front:
        lamp = Material(np.array([235.0, 235.0, 215.0]), 4, 3)
    body = np.array([[-w / 2, 0.25], [w / 2, 0.25], [w / 2, 0.55 * h], [0.47 * w, 0.62 * h],
                     [-0.47 * w, 0.62 * h], [-w / 2, 0.55 * h]])
    cabin = np.array([[-0.45 * w, 0.6 * h], [0.45 * w, 0.6 * h], [0.36 * w, h], [-0.36 * w, h]])
    window = np.array([[-0.38 * w, 0.66 * h], [0.38 * w, 0.66 * h], [0.32 * w, 0.94 * h],
                       [-0.32 * w, 0.94 * h]])
    prims = [Prim(_box(0.3, 0.4, 0.0, -0.36 * w), CAR, tyre),
             Prim(_box(0.3, 0.4, 0.0, 0.36 * w), CAR, tyre),
             Prim(body, CAR, paint), Prim(cabin, CAR, paint), Prim(window, CAR, glass),
             Prim(_box(0.22 * w, 0.08 * h, 0.47 * h, -0.36 * w), CAR, lamp),
             Prim(_box(0.22 * w, 0.08 * h, 0.47 * h, 0.36 * w), CAR, lamp)]
    return prims, w, h


def _pedestrian(rng: np.random.Generator) -> list[Prim]:
    s = rng.uniform(1.55, 1.9)
    top, legs, skin = sample_material(rng, 'clothes'), sample_material(rng, 'clothes'), \
        sample_material(rng, 'skin')
    stride = rng.uniform(0.0, 0.12) * s
    return [Prim(np.array([[-0.09 * s, 0], [-0.02 * s, 0], [-0.01 * s, 0.47 * s],
                           [-0.12 * s, 0.47 * s]]) + np.array([[-stride, 0]] * 2 + [[0, 0]] * 2),
                 PEDESTRIAN, legs),
            Prim(np.array([[0.02 * s, 0], [0.09 * s, 0], [0.12 * s, 0.47 * s],
                           [0.01 * s, 0.47 * s]]) + np.array([[stride, 0]] * 2 + [[0, 0]] * 2),
                 PEDESTRIAN, legs),
            Prim(np.array([[-0.13 * s, 0.45 * s], [0.13 * s, 0.45 * s], [0.14 * s, 0.8 * s],
                           [-0.14 * s, 0.8 * s]]), PEDESTRIAN, top),
            Prim(_ellipse(0, 0.88 * s, 0.065 * s, 0.08 * s, 14), PEDESTRIAN, skin)]


def _pole(rng: np.random.Generator, with_sign: bool) -> list[Prim]:
    h = rng.uniform(2.6, 6.0)
    prims = [Prim(_box(rng.uniform(0.08, 0.16), h), POLE, sample_material(rng, 'pole'))]
    if with_sign:
        r = rng.uniform(0.3, 0.45)
        cv = min(h - r, rng.uniform(2.2, 3.0))
        kind = rng.integers(3)
        if kind == 0:
            plate = _ellipse(0, cv, r, r, 18)
        elif kind == 1:
            plate = np.array([[-r, cv - 0.6 * r], [r, cv - 0.6 * r], [0, cv + 0.9 * r]])
        else:
            plate = _box(1.6 * r, 1.6 * r, cv - 0.8 * r)
        prims.append(Prim(plate, SIGN, sample_material(rng, 'sign')))
    return prims


def _tree(rng: np.random.Generator) -> list[Prim]:
    h = rng.uniform(2.0, 4.0)
    trunk = sample_material(rng, 'trunk')
    prims = [Prim(_box(rng.uniform(0.15, 0.35), h + 0.5), VEGETATION, trunk)]
    leaves = sample_material(rng, 'vegetation')
    r = rng.uniform(1.2, 2.6)
    for _ in range(rng.integers(3, 7)):
        cu, cv = rng.uniform(-0.6, 0.6) * r, h + r * rng.uniform(0.3, 1.1)
        rr = r * rng.uniform(0.45, 0.8)
        crown = _ellipse(cu, cv, rr, rr * rng.uniform(0.8, 1.1), 18)
        prims.append(Prim(crown, VEGETATION, leaves))
    return prims


def _clutter(rng: np.random.Generator) -> list[Prim]:
    mat = sample_material(rng, 'other')
    if rng.random() < 0.5:  # box or crate
        return [Prim(_box(rng.uniform(0.4, 1.4), rng.uniform(0.3, 1.1)), OTHER, mat)]
    w, h = rng.uniform(0.4, 0.7), rng.uniform(0.7, 1.2)  # bin / barrel: box with an elliptic lid
    return [Prim(_box(w, h), OTHER, mat), Prim(_ellipse(0, h, w / 2, 0.08, 16), OTHER, mat)]


def anomaly_shape(rng: np.random.Generator, family: str) -> list[tuple[np.ndarray, bool]]:
    """A non-convex shape of unit size as (polygon, erase) pairs, base at v=0, centred at u=0."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    rot = rng.uniform(0, 2 * np.pi)
    if family == 'star':
        k = int(rng.integers(5, 10))
        ang = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False) + rot
        rad = np.where(np.arange(2 * k) % 2 == 0, 0.5, 0.5 * rng.uniform(0.35, 0.6))
        parts = [(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1), False)]
    elif family == 'ring':
        r_in = rng.uniform(0.25, 0.38)
        if rng.random() < 0.5:
            parts = [(np.stack([0.5 * np.cos(t), 0.5 * np.sin(t)], 1), False),
                     (np.stack([r_in * np.cos(t), r_in * np.sin(t)], 1), True)]
        else:  # a C-ring as one non-convex polygon
            a = np.linspace(rot, rot + rng.uniform(1.2, 1.7) * np.pi, 40)
            outer = np.stack([0.5 * np.cos(a), 0.5 * np.sin(a)], 1)
            inner = np.stack([r_in * np.cos(a[::-1]), r_in * np.sin(a[::-1])], 1)
            parts = [(np.concatenate([outer, inner]), False)]
    elif family == 'crescent':
        d = rng.uniform(0.15, 0.32)
        r2 = rng.uniform(0.38, 0.5)
        parts = [(np.stack([0.5 * np.cos(t), 0.5 * np.sin(t)], 1), False),
                 (np.stack([d * np.cos(rot) + r2 * np.cos(t), d * np.sin(rot) + r2 * np.sin(t)],
                           1), True)]
    elif family == 'spiky':
        r = np.ones_like(t)
        for k in range(3, 10):
            r += rng.uniform(0, 0.45 / np.sqrt(k - 2)) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        r = 0.5 * np.clip(r, 0.15, None) / r.max()
        parts = [(np.stack([r * np.cos(t + rot), r * np.sin(t + rot)], 1), False)]
    elif family == 'cross':
        a, b = 0.5, rng.uniform(0.1, 0.2)
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
        c, s = np.cos(rot), np.sin(rot)
        parts = [(pts @ np.array([[c, s], [-s, c]]), False)]
    else:
        raise ValueError(f'unknown anomaly family {family!r}; expected one of {ANOMALY_FAMILIES}')
    lo = parts[0][0][:, 1].min()
    return [(p - [0.0, lo], erase) for p, erase in parts]


def _unit_area(parts: list[tuple[np.ndarray, bool]]) -> float:
    """Area (m^2) of a shape of unit size, by rasterising it on a 96x96 grid."""
    canvas = np.zeros((96, 96), np.uint8)
    for pts, erase in parts:
        q = ((pts + [0.5, 0.0]) * 80 + 8) * 16
        cv2.fillPoly(canvas, [q.astype(np.int32)], 0 if erase else 1, cv2.LINE_8, 4)
    return float(canvas.sum()) / 80.0 ** 2


# --------------------------------------------------------------------------- world sampling

def sample_camera(rng: np.random.Generator, size: tuple[int, int]) -> Camera:
    h, w = size
    return Camera(h, w, focal=w * rng.uniform(0.72, 0.95), horizon=h * rng.uniform(0.36, 0.5),
                  vx=w * (0.5 + rng.uniform(-0.12, 0.12)), cam_height=rng.uniform(1.3, 1.8))


def sample_world(rng: np.random.Generator, cam: Camera, length: float = 170.0,
                 n_anomalies: int = 0, anomaly_z: tuple[float, float] | None = None) -> World:
    """A street of the given length ahead of z=0; anomalies are sized for this camera.

    Without `anomaly_z` (stills) anomalies get an image-area share drawn log-uniformly from
    ANOMALY_AREA_RANGE; with it (drives) they stand in that depth range, the first one in the
    ego lane, which then carries no traffic so that the anomaly stays in view.
    """
    lanes = int(rng.integers(1, 5))
    lane_w = rng.uniform(3.0, 3.6)
    width = lanes * lane_w
    left = -width * rng.uniform(0.25, 0.75)
    road = (left, left + width)
    walks = (rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0))
    mats = {k: sample_material(rng, k) for k in ('road', 'line', 'sidewalk', 'terrain')}
    mats['yellow'] = Material(np.array([220.0, 185.0, 60.0]) * rng.uniform(0.85, 1.05), 8, 5)
    mats['curb'] = Material(mats['sidewalk'].colour * rng.uniform(0.75, 1.2), 8, 5)
    mats['grass'] = sample_material(rng, 'vegetation')
    overcast = rng.random() < 0.35
    zenith = (np.array([150.0, 155.0, 165.0]) if overcast else
              np.array([rng.uniform(60, 120), rng.uniform(120, 170), rng.uniform(200, 250)]))
    horizon_c = np.clip(zenith + rng.uniform(30, 70), 0, 255)
    light = {'gain': rng.uniform(0.65, 1.25), 'gamma': rng.uniform(0.85, 1.15),
             'left': rng.uniform(0.65, 1.1), 'right': rng.uniform(0.65, 1.1),
             'fog': rng.uniform(120, 500),
             'noise': rng.uniform(1.5, 7.0), 'blur': float(rng.random() < 0.5),
             'clouds': 0.0 if overcast else rng.uniform(0, 25)}
    for c in range(3):
        light[f'tint{c}'] = rng.uniform(0.92, 1.08)
    world = World(road=road, lanes=lanes, walks=walks,
                  verge_label=(VEGETATION if rng.random() < 0.4 else UNLABELED,
                               VEGETATION if rng.random() < 0.4 else UNLABELED),
                  mats=mats, line_yellow=lanes >= 2 and rng.random() < 0.5,
                  edge_lines=rng.random() < 0.7,
                  crosswalk=rng.uniform(8, 40) if rng.random() < 0.25 else None,
                  sky=(zenith, horizon_c), light=light, tiles=_noise_tiles(rng))
    _add_sides(rng, world, length)
    _add_traffic(rng, world, length, lane_w, clear_ego_lane=anomaly_z is not None)
    if n_anomalies:
        _add_anomalies(rng, world, cam, n_anomalies, anomaly_z)
    return world


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2 ** 31))


def _add_sides(rng: np.random.Generator, world: World, length: float) -> None:
    for side in (-1, 1):
        edge = world.road[0] - world.walks[0] if side < 0 else world.road[1] + world.walks[1]
        front = edge + side * rng.uniform(0.3, 4.0)
        z = rng.uniform(-10, 5)
        while z < length:
            seg = rng.uniform(6, 30)
            kind = rng.choice(['building', 'wall', 'fence', 'hedge', 'gap'],
                              p=[0.55, 0.13, 0.12, 0.1, 0.1])
            x = front + side * rng.uniform(0, 1.5)
            if kind == 'building':
                world.planes.append(Plane(BUILDING, x, z, z + seg, 0.0, rng.uniform(6, 28),
                                          sample_material(rng, 'building'), 'windows',
                                          sample_material(rng, 'glass'), _seed(rng)))
            elif kind == 'wall':
                world.planes.append(Plane(WALL, x, z, z + seg, 0.0, rng.uniform(1.2, 3.2),
                                          sample_material(rng, 'wall'), 'solid', None, _seed(rng)))
            elif kind == 'fence':
                world.planes.append(Plane(FENCE, x, z, z + seg, 0.0, rng.uniform(1.0, 2.2),
                                          sample_material(rng, 'fence'), 'fence', None,
                                          _seed(rng)))
            elif kind == 'hedge':
                world.planes.append(Plane(VEGETATION, x, z, z + seg, 0.0, rng.uniform(0.8, 2.0),
                                          sample_material(rng, 'vegetation'), 'hedge', None,
                                          _seed(rng)))
            z += seg + (rng.uniform(0, 4) if rng.random() < 0.3 else 0.0)
        # a second, taller row of buildings behind fills the skyline
        back = front + side * rng.uniform(8, 25)
        z = rng.uniform(-5, 20)
        while z < length + 60:
            seg = rng.uniform(10, 35)
            world.planes.append(Plane(BUILDING, back, z, z + seg, 0.0, rng.uniform(10, 40),
                                      sample_material(rng, 'building'), 'windows',
                                      sample_material(rng, 'glass'), _seed(rng)))
            z += seg + rng.uniform(0, 8)
        # street furniture on the sidewalk
        walk = world.walks[0 if side < 0 else 1]
        curb = world.road[0] if side < 0 else world.road[1]
        z = rng.uniform(2, 15)
        while z < length:
            r = rng.random()
            x_out = edge - side * rng.uniform(0.3, 0.7)
            if r < 0.3:
                world.sprites.append(Sprite(curb + side * 0.4, z, _pole(rng, rng.random() < 0.5),
                                            _seed(rng)))
            elif r < 0.55:
                world.sprites.append(Sprite(x_out, z, _tree(rng), _seed(rng)))
            elif r < 0.8:
                x = curb + side * rng.uniform(0.5, max(0.6, walk - 0.3))
                world.sprites.append(Sprite(x, z, _pedestrian(rng), _seed(rng)))
            else:
                world.sprites.append(Sprite(x_out, z, _clutter(rng), _seed(rng)))
            z += rng.uniform(4, 18)


def _add_traffic(rng: np.random.Generator, world: World, length: float, lane_w: float,
                 clear_ego_lane: bool = False) -> None:
    left, right = world.road
    for _ in range(int(rng.integers(0, 6))):
        lane = int(rng.integers(world.lanes))
        x = left + (lane + 0.5) * lane_w + rng.uniform(-0.3, 0.3)
        if abs(x) < 2.0 and clear_ego_lane:
            continue
        if abs(x) < 1.2 and rng.random() < 0.7:
            z = rng.uniform(12, length * 0.6)  # the ego lane keeps a distance
        else:
            z = rng.uniform(5, length * 0.6)
        _place_car(rng, world, x, z, front=x < 0 and world.lanes >= 2)
    for side, edge in ((-1, left), (1, right)):  # parked cars along the curb
        z = rng.uniform(3, 30)
        while z < length * 0.7 and rng.random() < 0.6:
            _place_car(rng, world, edge - side * 1.1, z, front=False)
            z += rng.uniform(6, 25)
    if rng.random() < 0.3:  # someone crossing the road
        world.sprites.append(Sprite(rng.uniform(left + 0.5, right - 0.5), rng.uniform(6, 40),
                                    _pedestrian(rng), _seed(rng)))


def _place_car(rng: np.random.Generator, world: World, x: float, z: float, front: bool) -> None:
    prims, w, h = _car(rng, front)
    length = rng.uniform(3.8, 4.8)
    world.sprites.append(Sprite(x, z, prims, _seed(rng), shadow=(w / 2 + 0.1, length, 0.45)))
    side_x = x - w / 2 if x > 0 else x + w / 2
    paint = prims[2].material
    world.planes.append(Plane(CAR, side_x, z, z + length, 0.25, 0.6 * h, paint, 'solid', None,
                              _seed(rng)))


def _add_anomalies(rng: np.random.Generator, world: World, cam: Camera, n: int,
                   z_range: tuple[float, float] | None) -> None:
    left, right = world.road
    area_img = cam.height * cam.width
    z_near = cam.focal * cam.cam_height / (cam.height - cam.horizon) + 0.5  # base still in view
    for i in range(n):
        family = ANOMALY_FAMILIES[rng.integers(len(ANOMALY_FAMILIES))]
        parts = anomaly_shape(rng, family)
        unit = _unit_area(parts)
        if z_range is None:
            share = np.exp(rng.uniform(*np.log(ANOMALY_AREA_RANGE)))
            side_px = np.sqrt(share * area_img / unit)
            size_m = np.exp(rng.uniform(np.log(0.3), np.log(2.5)))
            z = float(np.clip(cam.focal * size_m / side_px, z_near, 90.0))
            size_m = side_px * z / cam.focal
        else:
            z = rng.uniform(*z_range) if i else z_range[0] + rng.uniform(0, 10)
            size_m = rng.uniform(0.5, 1.6)
        if z_range is not None and i == 0:
            x = rng.uniform(-1.0, 1.0)
        elif rng.random() < 0.75:
            x = rng.uniform(left + 0.3, right - 0.3)
        else:
            side = rng.integers(2)
            x = (rng.uniform(left - world.walks[0], left) if side == 0
                 else rng.uniform(right, right + world.walks[1]))
        kinds = list(ANOMALY_MATERIAL_SOURCES)
        weights = np.array(list(ANOMALY_MATERIAL_SOURCES.values()))
        mat = sample_material(rng, kinds[rng.choice(len(kinds), p=weights / weights.sum())])
        prims = [Prim(p * size_m, 0 if erase else ANOMALY, mat) for p, erase in parts]
        world.sprites.append(Sprite(x, z, prims, _seed(rng)))


# --------------------------------------------------------------------------- rendering

class _Canvas:
    def __init__(self, cam: Camera) -> None:
        h, w = cam.height, cam.width
        self.img = np.zeros((h, w, 3), np.float32)
        self.lab = np.full((h, w), UNLABELED, np.uint8)
        self.depth = np.full((h, w), np.inf, np.float32)


def _tile_lookup(tiles: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sum of coarse and medium world-anchored noise at texel coordinates (u, v)."""
    mix = 0.8 * tiles[0] + 0.6 * tiles[1]
    fu, fv = np.floor(u), np.floor(v)
    au, av = (u - fu).astype(np.float32), (v - fv).astype(np.float32)
    iu, iv = np.mod(fu.astype(np.int64), TILE), np.mod(fv.astype(np.int64), TILE)
    ju, jv = np.mod(iu + 1, TILE), np.mod(iv + 1, TILE)
    top = mix[iv, iu] * (1 - au) + mix[iv, ju] * au
    bottom = mix[jv, iu] * (1 - au) + mix[jv, ju] * au
    return top * (1 - av) + bottom * av


def _shade(mat: Material, low: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Material colour with achromatic low-frequency and grain noise, (..., 3)."""
    lum = mat.amp * low + mat.grain * fine
    return mat.colour.astype(np.float32) + lum[..., None]


def _render_ground(cv: _Canvas, world: World, cam: Camera, fine: np.ndarray) -> None:
    h, w = cam.height, cam.width
    top = int(np.clip(np.floor(cam.horizon), 0, h - 1))
    rows = np.arange(top, h, dtype=np.float32) + 0.5
    dy = np.maximum(rows - cam.horizon, 0.25)
    z = (cam.focal * cam.cam_height / dy)[:, None] * np.ones((1, w), np.float32)  # (R, W)
    cols = np.arange(w, dtype=np.float32) + 0.5
    x = (cols[None, :] - cam.vx) * z / cam.focal
    zw = z + cam.z
    left, right = world.road
    lab = np.full(z.shape, UNLABELED, np.uint8)
    lab[x < left - world.walks[0]] = world.verge_label[0]
    lab[x > right + world.walks[1]] = world.verge_label[1]
    walk = (((x >= left - world.walks[0]) & (x < left))
            | ((x > right) & (x <= right + world.walks[1])))
    lab[walk] = SIDEWALK
    road = (x >= left) & (x <= right)
    lab[road] = ROAD
    near = z < 30
    lines = np.zeros(z.shape, bool)
    yellow = np.zeros(z.shape, bool)
    lane_w = (right - left) / world.lanes
    dash = np.mod(zw, 9.0) < 3.0
    for k in range(1, world.lanes):
        xb = left + k * lane_w
        on = np.abs(x - xb) < 0.075
        if world.line_yellow and k == world.lanes // 2:
            yellow |= (np.abs(x - xb - 0.12) < 0.06) | (np.abs(x - xb + 0.12) < 0.06)
        else:
            lines |= on & dash
    if world.edge_lines:
        lines |= (np.abs(x - left - 0.3) < 0.07) | (np.abs(x - right + 0.3) < 0.07)
    if world.crosswalk is not None:
        cz = world.crosswalk
        lines |= road & (zw > cz) & (zw < cz + 4) & (np.mod(x - left, 1.0) < 0.5)
    lab[(lines | yellow) & road] = ROAD_LINE
    u, v = x * TEXELS_PER_M, zw * TEXELS_PER_M
    low = _tile_lookup(world.tiles, u, v)
    img = np.empty(z.shape + (3,), np.float32)
    f = fine[top:]
    m = world.mats
    verge_l = m['grass'] if world.verge_label[0] == VEGETATION else m['terrain']
    verge_r = m['grass'] if world.verge_label[1] == VEGETATION else m['terrain']
    for mask, mat in ((x < 0, verge_l), (x >= 0, verge_r), (walk, m['sidewalk']),
                      (road, m['road']), (lines & road, m['line']), (yellow & road, m['yellow'])):
        img[mask] = _shade(mat, low[mask], f[mask])
    curb = walk & ((np.abs(x - left) < 0.2) | (np.abs(x - right) < 0.2))
    img[curb] = _shade(m['curb'], low[curb], f[curb])
    seams = walk & near & ((np.mod(x, 0.8) < 0.05) | (np.mod(zw, 0.8) < 0.05))
    img[seams] *= 0.82
    cv.img[top:] = img
    cv.lab[top:] = lab
    cv.depth[top:] = z


def _render_sky(cv: _Canvas, world: World, cam: Camera) -> None:
    top = int(np.clip(np.ceil(cam.horizon), 0, cam.height))
    if top == 0:
        return
    t = (np.arange(top, dtype=np.float32) / max(cam.horizon, 1.0))[:, None, None]
    zen, hor = world.sky
    sky = (1 - t) * zen.astype(np.float32) + t * hor.astype(np.float32)
    clouds = cv2.resize(world.tiles[0], (cam.width, top), interpolation=cv2.INTER_LINEAR)
    sky = sky + world.light['clouds'] * np.clip(clouds, 0, None)[..., None]
    cv.img[:top] = np.broadcast_to(sky, (top, cam.width, 3))


def _render_plane(cv: _Canvas, world: World, cam: Camera, p: Plane, fine: np.ndarray) -> None:
    if abs(p.x) < 0.2:
        return
    z0, z1 = max(p.z0 - cam.z, NEAR), p.z1 - cam.z
    if z1 <= z0:
        return
    xa, xb = cam.column(p.x, z0), cam.column(p.x, z1)
    c0, c1 = int(max(np.floor(min(xa, xb)), 0)), int(min(np.ceil(max(xa, xb)), cam.width))
    ys = [cam.row(y, z) for y in (p.y0, p.y1) for z in (z0, z1)]
    r0, r1 = int(max(np.floor(min(ys)), 0)), int(min(np.ceil(max(ys)), cam.height))
    if c1 <= c0 or r1 <= r0:
        return
    cols = np.arange(c0, c1, dtype=np.float32) + 0.5
    dx = cols - cam.vx
    with np.errstate(divide='ignore'):
        z = np.where(dx * p.x > 0, cam.focal * p.x / np.where(dx == 0, 1e-6, dx), -1.0)
    colok = (z >= z0) & (z <= z1)
    rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    y = cam.cam_height - (rows - cam.horizon) * z[None, :] / cam.focal  # (R, C)
    zw = np.broadcast_to(z[None, :] + cam.z, y.shape)
    mask = colok[None, :] & (y >= p.y0) & (y <= p.y1)
    if p.pattern == 'fence':
        mask &= (np.mod(zw, 0.25) < 0.07) | (np.abs(y - 0.85 * p.y1) < 0.05) | \
            (np.abs(y - 0.2 * p.y1) < 0.05)
    elif p.pattern == 'hedge':
        wob = 0.15 * np.sin(zw * 2.3 + p.seed % 7) + 0.1 * np.sin(zw * 5.1)
        mask &= y <= p.y1 + wob
    mask &= z[None, :] < cv.depth[r0:r1, c0:c1]
    if not mask.any():
        return
    u, v = zw[mask] * TEXELS_PER_M + p.seed % TILE, y[mask] * TEXELS_PER_M
    colour = _shade(p.material, _tile_lookup(world.tiles, u, v), fine[r0:r1, c0:c1][mask])
    if p.pattern == 'windows' and p.alt is not None:
        yw, zm = y[mask], zw[mask]
        win = (np.mod(yw, 3.2) > 1.0) & (np.mod(yw, 3.2) < 2.4) & \
            (np.mod(zm + p.seed % 5, 2.6) < 1.4) & (yw > 3.0) & (yw < p.y1 - 0.8)
        colour[win] = _shade(p.alt, _tile_lookup(world.tiles, u[win] * 0.3, v[win]),
                             fine[r0:r1, c0:c1][mask][win])
    side = world.light['left'] if p.x < 0 else world.light['right']
    sub = (slice(r0, r1), slice(c0, c1))
    cv.img[sub][mask] = colour * side
    cv.lab[sub][mask] = p.label
    cv.depth[sub][mask] = np.broadcast_to(z[None, :], mask.shape)[mask]


def _render_shadow(cv: _Canvas, cam: Camera, s: Sprite) -> None:
    hw, length, dark = s.shadow
    z0, z1 = s.z - cam.z - 0.2, s.z - cam.z + length
    if z0 < NEAR:
        return
    pts = np.array([[cam.column(s.x - hw, z0), cam.row(0, z0)],
                    [cam.column(s.x + hw, z0), cam.row(0, z0)],
                    [cam.column(s.x + hw, z1), cam.row(0, z1)],
                    [cam.column(s.x - hw, z1), cam.row(0, z1)]])
    if pts[:, 0].max() < 0 or pts[:, 0].min() >= cam.width:
        return
    pts = np.clip(pts, -4 * cam.width, 4 * cam.width)
    m = np.zeros(cv.lab.shape, np.uint8)
    cv2.fillPoly(m, [(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    ground = (m > 0) & np.isin(cv.lab, (ROAD, ROAD_LINE, SIDEWALK))
    cv.img[ground] *= 1 - dark


def _render_sprite(cv: _Canvas, cam: Camera, s: Sprite, fine: np.ndarray) -> None:
    z = s.z - cam.z
    if z < NEAR:
        return
    scale = cam.focal / z
    bx, by = cam.column(s.x, z), cam.row(0.0, z)
    pix = [np.stack([bx + p.pts[:, 0] * scale, by - p.pts[:, 1] * scale], 1) for p in s.prims]
    allp = np.concatenate(pix)
    c0, c1 = int(max(np.floor(allp[:, 0].min()), 0)), int(min(np.ceil(allp[:, 0].max()) + 1,
                                                               cam.width))
    r0, r1 = int(max(np.floor(allp[:, 1].min()), 0)), int(min(np.ceil(allp[:, 1].max()) + 1,
                                                               cam.height))
    if c1 <= c0 or r1 <= r0:
        return
    hh, ww = r1 - r0, c1 - c0
    lab = np.zeros((hh, ww), np.uint8)
    img = np.zeros((hh, ww, 3), np.float32)
    rng = np.random.default_rng(s.seed)
    # object-anchored low-frequency texture: the same cells at every distance
    cells = rng.standard_normal((6, 6)).astype(np.float32)
    low = cv2.resize(cells, (ww, hh), interpolation=cv2.INTER_CUBIC)
    grad = np.linspace(1.08, 0.92, hh, dtype=np.float32)[:, None]  # light from above
    m = np.zeros((hh, ww), np.uint8)
    for p, q in zip(s.prims, pix, strict=True):
        m[:] = 0
        cv2.fillPoly(m, [((q - [c0, r0]) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        sel = m > 0
        if p.label == 0:
            lab[sel] = 0
            continue
        lab[sel] = p.label
        img[sel] = _shade(p.material, low[sel], fine[r0:r1, c0:c1][sel]) * \
            np.broadcast_to(grad, (hh, ww))[sel][:, None]
    sel = (lab > 0) & (z < cv.depth[r0:r1, c0:c1])
    sub = (slice(r0, r1), slice(c0, c1))
    cv.img[sub][sel] = img[sel]
    cv.lab[sub][sel] = lab[sel]
    cv.depth[sub][sel] = z


def render(world: World, cam: Camera, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame: RGB uint8 (H, W, 3) and raw StreetHazards ids uint8 (H, W)."""
    cv = _Canvas(cam)
    fine = rng.standard_normal((cam.height, cam.width)).astype(np.float32)
    _render_sky(cv, world, cam)
    _render_ground(cv, world, cam, fine)
    for s in world.sprites:
        if s.shadow is not None:
            _render_shadow(cv, cam, s)
    for p in world.planes:
        _render_plane(cv, world, cam, p, fine)
    for s in world.sprites:
        _render_sprite(cv, cam, s, fine)
    light = world.light
    img = cv.img
    finite = np.isfinite(cv.depth)
    haze = np.zeros(cv.depth.shape, np.float32)
    haze[finite] = 1.0 - np.exp(-cv.depth[finite] / light['fog'])
    img = img + haze[..., None] * (world.sky[1].astype(np.float32) - img) * 0.8
    tint = np.array([light['tint0'], light['tint1'], light['tint2']], np.float32)
    img = np.clip(img * light['gain'] * tint, 0, 255)
    img = 255.0 * (img / 255.0) ** light['gamma']
    if light['blur']:
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img = img + light['noise'] * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), cv.lab


def render_scene(rng: np.random.Generator, size: tuple[int, int],
                 n_anomalies: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One still road scene from a fresh camera and world."""
    cam = sample_camera(rng, size)
    world = sample_world(rng, cam, n_anomalies=n_anomalies)
    return render(world, cam, rng)

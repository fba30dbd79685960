"""Procedural street scenes with exact Cityscapes-trainId masks (numpy + opencv).

Deterministic by seed. Each scene has a horizon and a vanishing point; road and sidewalks
converge to it, buildings and trees line the street, cars sit on the road and people on the
sidewalks, scaled by their distance. Textures (noise, windows, lane marks), a lighting gain
and a colour cast, shadows and sensor noise make the pixels less trivial than the masks.

Every object is also returned as a `SceneObject` (class, colour name, box, distance) so
the scene-QA data generator can ask and answer questions about the same frames.
"""
from dataclasses import dataclass, field

import cv2
import numpy as np

# Cityscapes trainIds used here.
ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BUS = (
    0, 1, 2, 5, 7, 8, 9, 10, 11, 13, 15)

# Named colours for objects the QA questions talk about (RGB).
OBJECT_COLORS = {
    'red': (200, 30, 30), 'blue': (30, 60, 200), 'white': (235, 235, 235),
    'black': (25, 25, 28), 'yellow': (230, 200, 30), 'green': (30, 150, 50),
}


@dataclass
class SceneObject:
    """One countable object: cars, buses and people."""

    kind: str            # 'car', 'bus' or 'person'
    color: str           # a key of OBJECT_COLORS (for a person: the shirt)
    box: tuple           # x0, y0, x1, y1 in pixels (visible extent, clipped to the image)
    distance: float      # 0 = at the camera, 1 = at the horizon

    @property
    def center_x(self):
        return 0.5 * (self.box[0] + self.box[2])

    @property
    def area(self):
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


@dataclass
class Scene:
    """A rendered scene: RGB image, trainId mask and the objects in it."""

    image: np.ndarray
    mask: np.ndarray
    objects: list = field(default_factory=list)
    seed: int = 0

    def share(self, class_id):
        """Fraction of pixels of one class."""
        return float((self.mask == class_id).mean())


def _noise(rng, h, w, scale, amp):
    """Smooth value noise in [-amp, amp] (HxW float32)."""
    small = rng.standard_normal((max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _fill(img, mask, poly, color, cls):
    pts = np.round(np.asarray(poly)).astype(np.int32)
    cv2.fillPoly(img, [pts], color)
    cv2.fillPoly(mask, [pts], int(cls))


def _box_mask(mask, x0, y0, x1, y1, cls):
    """Set an axis-aligned box of the mask, clipped to the image on every side."""
    h, w = mask.shape
    x0, x1 = int(np.clip(x0, 0, w)), int(np.clip(x1, 0, w))
    y0, y1 = int(np.clip(y0, 0, h)), int(np.clip(y1, 0, h))
    mask[y0:y1, x0:x1] = cls


def _jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


class StreetSceneGenerator:
    """Render street scenes; `render(seed)` is a pure function of (seed, size, options)."""

    def __init__(self, height=480, width=640, max_cars=4, max_people=3, allow_bus=True):
        self.height, self.width = int(height), int(width)
        self.max_cars, self.max_people, self.allow_bus = max_cars, max_people, allow_bus

    def render(self, seed, height=None, width=None):
        """Return a Scene for this seed (optionally at another size)."""
        rng = np.random.default_rng(seed)
        h, w = int(height or self.height), int(width or self.width)
        img = np.zeros((h, w, 3), np.uint8)
        mask = np.full((h, w), SKY, np.uint8)
        horizon = int(h * rng.uniform(0.35, 0.55))
        vx = w * rng.uniform(0.35, 0.65)
        self._sky(rng, img, horizon)
        self._buildings(rng, img, mask, horizon, vx)
        road_l, road_r = self._ground(rng, img, mask, horizon, vx)
        self._trees_and_poles(rng, img, mask, horizon, vx, road_l, road_r)
        objects = self._objects(rng, img, mask, horizon, vx, road_l, road_r)
        img = self._camera(rng, img)
        return Scene(img, mask, objects, seed)

    # -- layers, back to front -------------------------------------------------------
    def _sky(self, rng, img, horizon):
        top = np.array(_jitter(rng, (90, 140, 215), 25), np.float32)
        bottom = np.array(_jitter(rng, (200, 220, 240), 15), np.float32)
        t = np.linspace(0, 1, max(horizon, 1), dtype=np.float32)[:, None, None]
        img[:horizon] = (top * (1 - t) + bottom * t).astype(np.uint8)
        for _ in range(rng.integers(0, 4)):  # clouds: still sky
            c = (int(rng.uniform(0, img.shape[1])), int(rng.uniform(0, max(horizon * 0.7, 1))))
            ax = (int(rng.uniform(20, 80)), int(rng.uniform(8, 25)))
            cv2.ellipse(img, c, ax, 0, 0, 360, _jitter(rng, (240, 240, 245), 8), -1)

    def _buildings(self, rng, img, mask, horizon, vx):
        h, w = mask.shape
        for side in (-1, 1):
            x = 0.0 if side < 0 else float(w)
            edge = vx - 0.08 * w if side < 0 else vx + 0.08 * w
            while (side < 0 and x < edge) or (side > 0 and x > edge):
                bw = rng.uniform(0.08, 0.22) * w
                x0, x1 = (x, min(x + bw, edge)) if side < 0 else (max(x - bw, edge), x)
                top = horizon - rng.uniform(0.15, 0.9) * horizon
                base = horizon + 0.02 * h
                color = _jitter(rng, [(150, 150, 155), (170, 140, 110), (200, 190, 160),
                                      (120, 110, 115)][rng.integers(4)], 20)
                _fill(img, mask, [(x0, top), (x1, top), (x1, base), (x0, base)], color,
                      BUILDING)
                win = tuple(max(0, c - 70) for c in color)
                for wy in np.arange(top + 8, base - 14, rng.uniform(14, 24)):
                    for wx in np.arange(x0 + 5, x1 - 9, rng.uniform(12, 20)):
                        cv2.rectangle(img, (int(wx), int(wy)), (int(wx + 6), int(wy + 8)),
                                      win, -1)
                x = x1 if side < 0 else x0

    def _ground(self, rng, img, mask, horizon, vx):
        h, w = mask.shape
        half_road = rng.uniform(0.3, 0.5) * w
        walk = rng.uniform(0.12, 0.25) * w
        road_l, road_r = vx - half_road, vx + half_road
        # Terrain everywhere below the horizon, then sidewalks, then the road on top.
        _fill(img, mask, [(0, horizon), (w, horizon), (w, h), (0, h)],
              _jitter(rng, (110, 150, 80)), TERRAIN)
        _fill(img, mask, [(vx - 1, horizon), (vx + 1, horizon), (road_r + walk, h),
                          (road_l - walk, h)], _jitter(rng, (175, 170, 165)), SIDEWALK)
        road_col = _jitter(rng, (85, 85, 90), 12)
        _fill(img, mask, [(vx - 0.5, horizon), (vx + 0.5, horizon), (road_r, h), (road_l, h)],
              road_col, ROAD)
        ground = mask[horizon:] != SKY
        tex = _noise(rng, h - horizon, w, 6, 10)
        band = img[horizon:].astype(np.float32)
        band[ground] += tex[ground][:, None]
        img[horizon:] = np.clip(band, 0, 255).astype(np.uint8)
        # Dashed centre line: still road.
        for t0 in np.arange(0.05, 1.0, 0.12):
            t1 = t0 + 0.06
            ya, yb = horizon + (h - horizon) * t0 ** 1.5, horizon + (h - horizon) * t1 ** 1.5
            wa, wb = 1 + 4 * t0 ** 1.5, 1 + 4 * t1 ** 1.5
            cv2.fillPoly(img, [np.int32([(vx - wa, ya), (vx + wa, ya), (vx + wb, yb),
                                         (vx - wb, yb)])], (230, 230, 220))
        return road_l, road_r

    def _ground_x(self, t, horizon, vx, x_at_bottom):
        """Return the x of a ground line at depth parameter t (0 horizon .. 1 bottom)."""
        return vx + (x_at_bottom - vx) * t

    def _trees_and_poles(self, rng, img, mask, horizon, vx, road_l, road_r):
        h, w = mask.shape
        items = []
        for _ in range(rng.integers(1, 6)):
            items.append(('tree', rng.uniform(0.15, 0.9), rng.choice([-1, 1])))
        for _ in range(rng.integers(0, 3)):
            items.append(('pole', rng.uniform(0.2, 0.9), rng.choice([-1, 1])))
        for kind, t, side in sorted(items, key=lambda i: i[1]):
            xb = (road_l - 0.05 * w) if side < 0 else (road_r + 0.05 * w)
            x = self._ground_x(t, horizon, vx, xb)
            y = horizon + (h - horizon) * t
            s = t * h
            if kind == 'tree':
                trunk = max(2, int(0.03 * s))
                cv2.rectangle(img, (int(x - trunk), int(y - 0.5 * s)), (int(x + trunk), int(y)),
                              (90, 70, 50), -1)
                _box_mask(mask, x - trunk, y - 0.5 * s, x + trunk, y, VEGETATION)
                cr = max(3, int(0.3 * s))
                center = (int(x), int(y - 0.6 * s))
                green = _jitter(rng, (60, 120, 45), 25)
                cv2.circle(img, center, cr, green, -1)
                cv2.circle(mask, center, cr, VEGETATION, -1)
                for _ in range(3):  # leaf clumps for texture
                    o = (int(x + rng.uniform(-0.6, 0.6) * cr), int(y - 0.6 * s + rng.uniform(
                        -0.6, 0.6) * cr))
                    cv2.circle(img, o, max(2, cr // 3), _jitter(rng, green, 20), -1)
            else:
                pw = max(1, int(0.012 * s))
                top = int(y - 0.9 * s)
                cv2.rectangle(img, (int(x - pw), top), (int(x + pw), int(y)), (120, 120, 125),
                              -1)
                _box_mask(mask, x - pw, top, x + pw + 1, y, POLE)
                r = max(3, int(0.05 * s))
                c = (int(x), top + r)
                cv2.circle(img, c, r, (200, 30, 30), -1)
                cv2.circle(img, c, max(1, int(r * 0.6)), (240, 240, 240), -1)
                cv2.circle(mask, c, r, TRAFFIC_SIGN, -1)

    def _objects(self, rng, img, mask, horizon, vx, road_l, road_r):
        h, w = mask.shape
        placed = []
        n_cars = int(rng.integers(0, self.max_cars + 1))
        n_people = int(rng.integers(0, self.max_people + 1))
        for _ in range(n_cars):
            kind = 'bus' if self.allow_bus and rng.random() < 0.12 else 'car'
            placed.append((kind, rng.uniform(0.25, 1.0), rng.uniform(0.1, 0.9)))
        for _ in range(n_people):
            placed.append(('person', rng.uniform(0.3, 1.0), rng.choice([-0.12, 1.12])
                           + rng.uniform(-0.08, 0.08)))
        objects = []
        for kind, t, lane in sorted(placed, key=lambda p: p[1]):  # far first
            y = horizon + (h - horizon) * t
            xl = self._ground_x(t, horizon, vx, road_l)
            xr = self._ground_x(t, horizon, vx, road_r)
            x = xl + (xr - xl) * lane
            s = t * h
            color = list(OBJECT_COLORS)[rng.integers(len(OBJECT_COLORS))]
            rgb = OBJECT_COLORS[color]
            if kind == 'person':
                box = self._person(rng, img, mask, x, y, s, rgb)
            else:
                box = self._vehicle(rng, img, mask, x, y, s, rgb, kind)
            box = (max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3]))
            if box[2] - box[0] >= 3 and box[3] - box[1] >= 3:
                objects.append(SceneObject(kind, color, tuple(int(v) for v in box), 1.0 - t))
        # Occlusion: an object drawn later may hide one drawn earlier; keep the counts
        # honest by dropping objects with almost no visible pixels of their class.
        cls = {'car': CAR, 'bus': BUS, 'person': PERSON}
        visible = []
        for o in objects:
            x0, y0, x1, y1 = o.box
            if (mask[y0:y1, x0:x1] == cls[o.kind]).sum() >= 0.25 * max(o.area, 1):
                visible.append(o)
        return visible

    def _vehicle(self, rng, img, mask, x, y, s, rgb, kind):
        cw = s * (0.55 if kind == 'car' else 0.8)
        ch = s * (0.32 if kind == 'car' else 0.6)
        cls = CAR if kind == 'car' else BUS
        body = _jitter(rng, rgb, 10)
        x0, x1, y0 = x - cw / 2, x + cw / 2, y - ch
        # Body, cabin (cars are narrower on top), windows, wheels: all the vehicle class.
        if kind == 'car':
            _fill(img, mask, [(x0, y - 0.55 * ch), (x1, y - 0.55 * ch), (x1, y - 0.1 * ch),
                              (x0, y - 0.1 * ch)], body, cls)
            _fill(img, mask, [(x0 + 0.18 * cw, y0), (x1 - 0.18 * cw, y0),
                              (x1 - 0.05 * cw, y - 0.55 * ch), (x0 + 0.05 * cw, y - 0.55 * ch)],
                  body, cls)
            cv2.fillPoly(img, [np.int32([(x0 + 0.24 * cw, y0 + 0.12 * ch),
                                         (x1 - 0.24 * cw, y0 + 0.12 * ch),
                                         (x1 - 0.12 * cw, y - 0.6 * ch),
                                         (x0 + 0.12 * cw, y - 0.6 * ch)])], (60, 80, 100))
        else:
            _fill(img, mask, [(x0, y0), (x1, y0), (x1, y - 0.1 * ch), (x0, y - 0.1 * ch)],
                  body, cls)
            for wx in np.linspace(x0 + 0.05 * cw, x1 - 0.2 * cw, 5):
                cv2.rectangle(img, (int(wx), int(y0 + 0.12 * ch)),
                              (int(wx + 0.13 * cw), int(y0 + 0.4 * ch)), (60, 80, 100), -1)
        r = max(2, int(0.09 * cw))
        for wx in (x0 + 0.2 * cw, x1 - 0.2 * cw):
            cv2.circle(img, (int(wx), int(y - 0.12 * ch)), r, (20, 20, 20), -1)
            cv2.circle(mask, (int(wx), int(y - 0.12 * ch)), r, cls, -1)
        # Contact shadow on the road under the vehicle (road class, darker pixels).
        sh = slice(int(y), min(img.shape[0], int(y + 0.05 * ch) + 1))
        xs = slice(max(0, int(x0)), max(0, int(x1)))
        img[sh, xs] = (img[sh, xs] * 0.55).astype(np.uint8)
        return (int(x0), int(y0), int(x1), int(y))

    def _person(self, rng, img, mask, x, y, s, shirt):
        ph = s * 0.42
        pw = ph * 0.28
        legs = _jitter(rng, (50, 50, 70), 15)
        skin = _jitter(rng, (200, 160, 130), 30)
        _fill(img, mask, [(x - pw / 2, y - 0.5 * ph), (x + pw / 2, y - 0.5 * ph),
                          (x + pw / 2.5, y), (x - pw / 2.5, y)], legs, PERSON)
        _fill(img, mask, [(x - pw / 2, y - 0.82 * ph), (x + pw / 2, y - 0.82 * ph),
                          (x + pw / 2, y - 0.48 * ph), (x - pw / 2, y - 0.48 * ph)],
              _jitter(rng, shirt, 10), PERSON)
        r = max(1, int(pw * 0.38))
        c = (int(x), int(y - 0.82 * ph - r))
        cv2.circle(img, c, r, skin, -1)
        cv2.circle(mask, c, r, PERSON, -1)
        return (int(x - pw / 2), int(y - 0.82 * ph - 2 * r), int(x + pw / 2), int(y))

    def _camera(self, rng, img):
        """Exposure, colour cast, vignetting-free gradient light, blur and sensor noise."""
        f = img.astype(np.float32)
        gain = rng.uniform(0.65, 1.25)
        cast = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        h, w = img.shape[:2]
        light = np.linspace(rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1), w,
                            dtype=np.float32)[None, :, None]
        f = f * gain * cast * light
        if rng.random() < 0.5:
            f = cv2.GaussianBlur(f, (3, 3), 0)
        f += rng.normal(0, rng.uniform(1, 6), f.shape).astype(np.float32)
        return np.clip(f, 0, 255).astype(np.uint8)


def render_scene(seed, height=480, width=640):
    """Return one Scene (convenience wrapper)."""
    return StreetSceneGenerator(height, width).render(seed)

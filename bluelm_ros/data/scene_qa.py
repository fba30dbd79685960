"""Scene question answering data: street scenes with templated questions (numpy, no torch).

A deterministic generator of ``(image, question, answer, question type)`` from integer
seeds, built on the synthetic street scenes of :mod:`bluelm_ros.data.synthetic` (so the
demo's segmentation and the VLM's answers describe the same frames). Every answer is
derived from the scene's object list and trainId mask, and a question that would be
ambiguous for this scene is never asked: the generator picks another question of the
same type or renders another scene (``sample``) until the answer is clear-cut.

Question types (:data:`QTYPES`) and examples:

* ``presence``  "is there a bus?" -> "no";  "do you see a red car?" -> "yes"
* ``count``     "how many people are there?" -> "2" (digits; cars, buses, people, vehicles)
* ``color``     "what color is the car on the left?" -> "blue";
  "what color shirt is the nearest person wearing?" -> "red"
* ``position``  "is the bus on the left or the right?" -> "right";
  "is the white car near or far?" -> "far";
  "which is closer, the car or the person in red?" -> "the person in red"
* ``largest``   "what covers most of the image?" -> "road";
  "is there more sky or building?" -> "sky"
* ``caption``   "describe the scene." -> "a street with 2 cars and 1 person."

Clear-cut rules (the thresholds are module constants): objects are only asked about in
scenes where every car/bus/person shows >= 40 % of its silhouette, none is cut
by the image border (< 60 % of its width inside) and no object is only visible as a
sliver that the renderer dropped from the object list; left/right needs the object's
centre outside the middle 16 % of the width; "the car on the left" / "leftmost" needs a
gap of 10 % of the width to the next car; nearest/farthest a depth gap of 0.1; near/far
a distance <= 0.3 or >= 0.5; region comparisons a 5-point margin in image share.

Image sizes: each seed draws an aspect ratio (0.55 portrait .. 2.2 wide) and a nominal
size with width 320..800 and height 240..600, so the dynamic-resolution tiler picks
different grids. For fast training data the scene may be rendered smaller than nominal
(``scale_range``, never below ``min_side`` pixels on the short side): the renderer draws
at any size, and the tiler only keeps about 300 x 150 pixels of a scene anyway.

Seeds: training uses seeds below :data:`HELDOUT_SEED_BASE`; :func:`heldout_samples`
draws the held-out evaluation set above it (equal count per question type), and
:func:`evaluate` scores any ``answer(image, question)`` engine on it.

Training helpers: :meth:`SceneQAGenerator.scene_questions` (one scene, many questions),
:func:`flip_scene` (mirror image with mirrored objects) and :func:`color_map` (per-pixel
object colour, a target of the training's auxiliary loss). Note that the renderer lists
an object when enough pixels of its class lie in its box, which counts a car hidden
behind another car; :func:`object_issues` catches such scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from bluelm_ros.data import synthetic as syn

QTYPES = ('presence', 'count', 'color', 'position', 'largest', 'caption')
KINDS = ('car', 'bus', 'person')
PLURAL = {'car': 'cars', 'bus': 'buses', 'person': 'people', 'vehicle': 'vehicles'}
KIND_CLASS = {'car': syn.CAR, 'bus': syn.BUS, 'person': syn.PERSON}
COLORS = tuple(syn.OBJECT_COLORS)
# trainId -> region name used in answers
REGION_NAMES = {
    syn.ROAD: 'road', syn.SIDEWALK: 'sidewalk', syn.BUILDING: 'building', syn.POLE: 'pole',
    syn.TRAFFIC_SIGN: 'traffic sign', syn.VEGETATION: 'vegetation', syn.TERRAIN: 'terrain',
    syn.SKY: 'sky', syn.PERSON: 'person', syn.CAR: 'car', syn.BUS: 'bus'}
COMPARE_REGIONS = ('road', 'sky', 'building', 'vegetation', 'sidewalk', 'terrain')
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
                'nine', 'ten')

# Seeds >= this are held out (evaluation); training seeds stay below.
HELDOUT_SEED_BASE = 1_000_000_000
# The training's learning curve is measured on its own held-out seeds (not the reported
# held-out set), and a last check uses seeds far from every range the code uses.
VALIDATION_SEED_BASE = 1_500_000_000
FRESH_SEED_BASE = 7_300_000_000
# Scene seed of attempt a for sample seed s: s * MAX_ATTEMPTS + a (unique per (s, a)).
MAX_ATTEMPTS = 64

# clear-cut thresholds
MIN_VISIBLE = 0.4         # visible fraction of every object's silhouette
MIN_INSIDE = 0.6          # fraction of an object's nominal width inside the image
SIDE_MARGIN = 0.08        # left/right: |centre_x - w/2| >= SIDE_MARGIN * w
ORDER_GAP_X = 0.10        # leftmost/rightmost: gap to the next object >= ORDER_GAP_X * w
ORDER_GAP_DEPTH = 0.10    # nearest/farthest: depth gap to the next object
NEAR_MAX, FAR_MIN = 0.30, 0.50   # near/far by distance (0 = camera, 1 = horizon)
CLOSER_GAP = 0.15         # "which is closer" depth gap
REGION_MARGIN = 0.05      # region share margin (largest region, more X or Y)

# Nominal box width / height of an unoccluded object (see synthetic._vehicle/_person).
_ASPECT = {'car': 0.55 / 0.32, 'bus': 0.8 / 0.6, 'person': 0.28 / 1.03}
# Silhouette pixels / box area of an unoccluded object (measured on rendered scenes).
_FILL = {'car': 0.86, 'bus': 0.92, 'person': 0.86}

DEFAULT_TYPE_WEIGHTS = {'presence': 1.0, 'count': 1.0, 'color': 1.0, 'position': 1.0,
                        'largest': 1.0, 'caption': 1.0}

# question templates ({x}: object phrase, {p}: plural, {r}: reference phrase)
PRESENCE_TEMPLATES = ('is there a {x}?', 'is there a {x} in the image?', 'do you see a {x}?')
PRESENCE_ANY_TEMPLATE = 'are there any {p}?'
COUNT_TEMPLATES = ('how many {p} are there?', 'how many {p} can you see?', 'count the {p}.')
COLOR_TEMPLATE = 'what color is the {r}?'
SHIRT_TEMPLATE = 'what color shirt is the {r} wearing?'
SIDE_TEMPLATE = 'is the {r} on the left or the right?'
NEAR_FAR_TEMPLATE = 'is the {r} near or far?'
CLOSER_TEMPLATE = 'which is closer, the {a} or the {b}?'
LARGEST_TEMPLATES = ('what covers most of the image?', 'what is the largest region?',
                     'which region is the largest?')
MORE_TEMPLATE = 'is there more {a} or {b}?'
CAPTION_TEMPLATES = ('describe the scene.', 'describe the image.', 'what do you see?')
# reference phrases for one object among several of its kind
ORDER_REFS = ('on the left', 'on the right', 'leftmost', 'rightmost', 'nearest', 'farthest')


@dataclass
class QASample:
    """One question about one rendered scene."""

    image: np.ndarray      # H x W x 3 uint8 RGB
    question: str
    answer: str
    qtype: str
    seed: int              # sample seed
    scene: Any             # seg.synthetic.Scene (objects, mask) the answer is derived from

    @property
    def size(self) -> tuple:
        """``(width, height)`` of the image."""
        return int(self.image.shape[1]), int(self.image.shape[0])


# ---------------------------------------------------------------------------
# phrases


def object_phrase(kind: str, color: Optional[str] = None) -> str:
    """Name an object: 'car', 'red car', 'person', 'person in red'."""
    if color is None:
        return kind
    return f'person in {color}' if kind == 'person' else f'{color} {kind}'


def order_phrase(kind: str, ref: str) -> str:
    """Name an object by order: 'car on the left', 'leftmost car', 'nearest person'."""
    return f'{kind} {ref}' if ref.startswith('on the') else f'{ref} {kind}'


def caption_for(counts: dict) -> str:
    """Caption from counts: 'a street with 2 cars, 1 bus and 1 person.', 'an empty street.'."""
    parts = []
    for kind in ('car', 'bus', 'person'):
        n = counts.get(kind, 0)
        if n:
            parts.append(f'{n} {kind if n == 1 else PLURAL[kind]}')
    if not parts:
        return 'an empty street.'
    text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
    return f'a street with {text}.'


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: lower case, single spaces, no final period.

    Number words become digits ('two' -> '2') and a leading article of a one-word
    answer is kept, so 'The car.' matches 'the car'.
    """
    t = ' '.join(str(text).lower().strip().split())
    t = t.rstrip(' .')
    if t in NUMBER_WORDS:
        t = str(NUMBER_WORDS.index(t))
    return t


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)


# ---------------------------------------------------------------------------
# scene analysis


def count_objects(scene) -> dict:
    """Objects per kind."""
    counts = {k: 0 for k in KINDS}
    for o in scene.objects:
        counts[o.kind] += 1
    return counts


def region_shares(scene) -> dict:
    """Share of the image per region name (from the trainId mask)."""
    hist = np.bincount(scene.mask.ravel(), minlength=256).astype(np.float64)
    hist /= max(1.0, float(scene.mask.size))
    return {name: float(hist[cid]) for cid, name in REGION_NAMES.items()}


def _cover(box, others: Sequence) -> np.ndarray:
    """Boolean map over ``box`` of the pixels inside any of the ``others``' boxes."""
    x0, y0, x1, y1 = box
    cover = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool)
    for p in others:
        a0, b0 = max(p.box[0], x0) - x0, max(p.box[1], y0) - y0
        a1, b1 = min(p.box[2], x1) - x0, min(p.box[3], y1) - y0
        if a1 > a0 and b1 > b0:
            cover[b0:b1, a0:a1] = True
    return cover


def visible_fraction(scene, obj) -> float:
    """Estimated fraction of an object's silhouette that is visible (0..1).

    Own-class pixels in its box, not counting those inside the boxes of nearer objects
    of the same kind (they may belong to them), over the unoccluded silhouette area
    (box area times the kind's fill ratio).
    """
    x0, y0, x1, y1 = obj.box
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        return 0.0
    own = scene.mask[y0:y1, x0:x1] == KIND_CLASS[obj.kind]
    same = [p for p in scene.objects
            if p is not obj and p.kind == obj.kind and p.distance < obj.distance]
    if same:
        own &= ~_cover(obj.box, same)
    return min(1.0, float(own.sum()) / (area * _FILL[obj.kind]))


def object_issues(scene) -> list:
    """Reasons the scene's objects are not clear-cut (empty list = all clear).

    Checks each listed object's visible fraction (occlusion by nearer objects),
    truncation at the image border, and class pixels outside every listed object's
    (slightly grown) box, i.e. a sliver of an object the renderer dropped as hidden.
    """
    h, w = scene.mask.shape
    issues = []
    for i, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.box
        bw, bh = x1 - x0, y1 - y0
        if bh <= 0 or bw <= 0:
            issues.append(f'{i}:{o.kind}: empty box')
            continue
        inside = bw / (_ASPECT[o.kind] * bh)
        if inside < MIN_INSIDE:
            issues.append(f'{i}:{o.kind}: cut by the border ({inside:.2f})')
        vis = visible_fraction(scene, o)
        if vis < MIN_VISIBLE:
            issues.append(f'{i}:{o.kind}: occluded ({vis:.2f} visible)')
    for kind, cid in KIND_CLASS.items():
        stray = scene.mask == cid
        if not stray.any():
            continue
        for o in scene.objects:
            if o.kind != kind:
                continue
            x0, y0, x1, y1 = o.box
            g = int(math.ceil(0.15 * (y1 - y0))) + 1
            stray[max(0, y0 - g):y1 + g, max(0, x0 - g):x1 + g] = False
        n = int(stray.sum())
        if n > max(6, 2e-4 * h * w):
            issues.append(f'{kind}: {n} pixels outside the listed objects')
    return issues


def _unique_refs(scene) -> list:
    """``(phrase, object)`` for each object that a short phrase identifies uniquely."""
    out = []
    for kind in KINDS:
        objs = [o for o in scene.objects if o.kind == kind]
        if len(objs) == 1:
            out.append((object_phrase(kind), objs[0]))
        for color in COLORS:
            same = [o for o in objs if o.color == color]
            if len(same) == 1 and len(objs) > 1:
                out.append((object_phrase(kind, color), same[0]))
    return out


def _order_refs(scene) -> list:
    """``(kind, ref, object)`` for leftmost/rightmost/nearest/farthest with clear gaps."""
    w = scene.mask.shape[1]
    out = []
    for kind in KINDS:
        objs = [o for o in scene.objects if o.kind == kind]
        if len(objs) < 2:
            continue
        by_x = sorted(objs, key=lambda o: o.center_x)
        by_d = sorted(objs, key=lambda o: o.distance)
        two = len(objs) == 2
        if by_x[1].center_x - by_x[0].center_x >= ORDER_GAP_X * w:
            out.append((kind, 'on the left' if two else 'leftmost', by_x[0]))
        if by_x[-1].center_x - by_x[-2].center_x >= ORDER_GAP_X * w:
            out.append((kind, 'on the right' if two else 'rightmost', by_x[-1]))
        if by_d[1].distance - by_d[0].distance >= ORDER_GAP_DEPTH:
            out.append((kind, 'nearest', by_d[0]))
        if by_d[-1].distance - by_d[-2].distance >= ORDER_GAP_DEPTH:
            out.append((kind, 'farthest', by_d[-1]))
    return out


def side_of(obj, width: int) -> Optional[str]:
    """Return 'left' / 'right' of the image centre, None inside the middle band."""
    off = obj.center_x - 0.5 * width
    if abs(off) < SIDE_MARGIN * width:
        return None
    return 'left' if off < 0 else 'right'


def near_far(obj) -> Optional[str]:
    """Return 'near' / 'far' by distance, None in the ambiguous middle."""
    if obj.distance <= NEAR_MAX:
        return 'near'
    if obj.distance >= FAR_MIN:
        return 'far'
    return None


# ---------------------------------------------------------------------------
# question builders: (scene, rng, u) -> (question, answer) or None (nothing clear to ask)
# ``u`` in [0, 1) is fixed per sample (the same for every scene attempt), so a builder's
# main choice (yes or no, what to count) is not biased by which scenes fail.


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _pick_family(rng, families: dict, weights: Optional[dict] = None):
    """Choose a non-empty family (weighted), then one of its candidates."""
    keys = [k for k in families if families[k]]
    if not keys:
        return None
    wts = np.array([(weights or {}).get(k, 1.0) for k in keys], np.float64)
    k = keys[int(rng.choice(len(keys), p=wts / wts.sum()))]
    return _pick(rng, families[k])


def ask_presence(scene, rng, u=0.0):
    """Ask whether there is a car / a red car / any people (``u < 0.5``: yes)."""
    want_yes = bool(u < 0.5)
    counts = count_objects(scene)
    present_pairs = {(o.kind, o.color) for o in scene.objects}
    if rng.random() < 0.3:  # with a colour
        pairs = [(k, c) for k in KINDS for c in COLORS if ((k, c) in present_pairs) == want_yes]
        if not pairs:
            return None
        kind, color = _pick(rng, pairs)
        q = _pick(rng, PRESENCE_TEMPLATES).format(x=object_phrase(kind, color))
    else:
        kinds = [k for k in KINDS if (counts[k] > 0) == want_yes]
        if not kinds:
            return None
        kind = _pick(rng, kinds)
        if rng.random() < 0.25:
            q = PRESENCE_ANY_TEMPLATE.format(p=PLURAL[kind])
        else:
            q = _pick(rng, PRESENCE_TEMPLATES).format(x=kind)
    return q, 'yes' if want_yes else 'no'


def ask_count(scene, rng, u=0.0):
    """Ask how many cars / buses / people / vehicles (``u`` picks which)."""
    counts = count_objects(scene)
    counts['vehicle'] = counts['car'] + counts['bus']
    r = u
    what = 'car' if r < 0.35 else 'person' if r < 0.7 else 'vehicle' if r < 0.85 else 'bus'
    return _pick(rng, COUNT_TEMPLATES).format(p=PLURAL[what]), str(counts[what])


def _color_question(kind, phrase):
    return (SHIRT_TEMPLATE if kind == 'person' else COLOR_TEMPLATE).format(r=phrase)


def ask_color(scene, rng, u=0.0):
    """Ask the colour of the car / the car on the left / the nearest person's shirt."""
    counts = count_objects(scene)
    single = [(k, o) for k in KINDS for o in scene.objects if o.kind == k and counts[k] == 1]
    families = {
        'single': [(_color_question(k, k), o.color) for k, o in single],
        'order': [(_color_question(k, order_phrase(k, ref)), o.color)
                  for k, ref, o in _order_refs(scene)],
    }
    return _pick_family(rng, families)


def ask_position(scene, rng, u=0.0):
    """Ask left or right / near or far of a uniquely named object, or which is closer."""
    w = scene.mask.shape[1]
    refs = _unique_refs(scene)
    side = [(SIDE_TEMPLATE.format(r=p), s) for p, o in refs
            for s in [side_of(o, w)] if s]
    depth = [(NEAR_FAR_TEMPLATE.format(r=p), d) for p, o in refs for d in [near_far(o)] if d]
    closer = []
    for i, (pa, oa) in enumerate(refs):
        for pb, ob in refs[i + 1:]:
            if oa is ob or abs(oa.distance - ob.distance) < CLOSER_GAP:
                continue
            a, b = ((pa, pb) if rng.random() < 0.5 else (pb, pa))
            best = pa if oa.distance < ob.distance else pb
            closer.append((CLOSER_TEMPLATE.format(a=a, b=b), f'the {best}'))
    return _pick_family(rng, {'side': side, 'depth': depth, 'closer': closer},
                        {'side': 1.0, 'depth': 1.0, 'closer': 0.6})


def ask_largest(scene, rng, u=0.0):
    """Ask for the largest region, or which of two regions covers more of the image."""
    shares = region_shares(scene)
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    largest = []
    if ranked[0][1] - ranked[1][1] >= REGION_MARGIN:
        largest = [(q, ranked[0][0]) for q in LARGEST_TEMPLATES]
    more = []
    for i, a in enumerate(COMPARE_REGIONS):
        for b in COMPARE_REGIONS[i + 1:]:
            if abs(shares[a] - shares[b]) >= REGION_MARGIN:
                x, y = (a, b) if rng.random() < 0.5 else (b, a)
                more.append((MORE_TEMPLATE.format(a=x, b=y),
                             a if shares[a] > shares[b] else b))
    return _pick_family(rng, {'largest': largest, 'more': more})


def ask_caption(scene, rng, u=0.0):
    """Ask for a short templated caption with the object counts."""
    return _pick(rng, CAPTION_TEMPLATES), caption_for(count_objects(scene))


BUILDERS: dict = {'presence': ask_presence, 'count': ask_count, 'color': ask_color,
                  'position': ask_position, 'largest': ask_largest, 'caption': ask_caption}
# question types that talk about objects (need a clear-cut scene)
OBJECT_QTYPES = ('presence', 'count', 'color', 'position', 'caption')


# ---------------------------------------------------------------------------
# generator


class SceneQAGenerator:
    """Deterministic ``seed -> QASample`` over synthetic street scenes.

    ``scale_range`` renders the scene at ``scale * nominal size`` (scale drawn per seed,
    clipped so the short side stays >= ``min_side``); ``(1, 1)`` renders at the nominal
    320..800 x 240..600 size. ``type_weights`` sets the question-type mix of
    :meth:`sample` when no type is requested.
    """

    def __init__(self, width_range: Sequence = (320, 800), height_range: Sequence = (240, 600),
                 aspect_range: Sequence = (0.55, 2.2), scale_range: Sequence = (1.0, 1.0),
                 min_side: int = 144, type_weights: Optional[dict] = None,
                 max_cars: int = 4, max_people: int = 3, allow_bus: bool = True):
        self.width_range = (int(width_range[0]), int(width_range[1]))
        self.height_range = (int(height_range[0]), int(height_range[1]))
        self.aspect_range = (float(aspect_range[0]), float(aspect_range[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.min_side = int(min_side)
        weights = dict(DEFAULT_TYPE_WEIGHTS if type_weights is None else type_weights)
        unknown = set(weights) - set(QTYPES)
        if unknown:
            raise ValueError(f'unknown question types {sorted(unknown)}')
        self.qtypes = tuple(t for t in QTYPES if weights.get(t, 0) > 0)
        p = np.array([weights[t] for t in self.qtypes], np.float64)
        self.type_p = p / p.sum()
        self.max_cars, self.max_people, self.allow_bus = max_cars, max_people, allow_bus
        lo_a = max(self.aspect_range[0], self.width_range[0] / self.height_range[1])
        hi_a = min(self.aspect_range[1], self.width_range[1] / self.height_range[0])
        if lo_a > hi_a:
            raise ValueError('aspect_range does not fit width_range / height_range')
        self._aspect = (lo_a, hi_a)

    # -- sizes and scenes --------------------------------------------------------

    def image_size(self, seed: int) -> tuple:
        """``((nominal_w, nominal_h), (render_w, render_h))`` for a sample seed."""
        rng = np.random.default_rng([int(seed), 11])
        a = math.exp(rng.uniform(math.log(self._aspect[0]), math.log(self._aspect[1])))
        w_lo = max(self.width_range[0], self.height_range[0] * a)
        w_hi = min(self.width_range[1], self.height_range[1] * a)
        w = rng.uniform(w_lo, w_hi)
        h = min(max(w / a, self.height_range[0]), self.height_range[1])
        nw, nh = int(round(w)), int(round(h))
        s = rng.uniform(*self.scale_range)
        s = min(1.0, max(s, self.min_side / min(nw, nh)))
        return (nw, nh), (max(1, int(round(nw * s))), max(1, int(round(nh * s))))

    def render(self, seed: int, attempt: int = 0):
        """Render the scene of (sample seed, attempt) at the seed's render size."""
        if not 0 <= attempt < MAX_ATTEMPTS:
            raise ValueError(f'attempt must be in [0, {MAX_ATTEMPTS})')
        _, (w, h) = self.image_size(seed)
        gen = syn.StreetSceneGenerator(h, w, self.max_cars, self.max_people, self.allow_bus)
        return gen.render(int(seed) * MAX_ATTEMPTS + attempt)

    def qtype_for(self, seed: int) -> str:
        """Question type a seed gets when none is requested."""
        rng = np.random.default_rng([int(seed), 13])
        return self.qtypes[int(rng.choice(len(self.qtypes), p=self.type_p))]

    # -- samples -----------------------------------------------------------------

    def sample(self, seed: int, qtype: Optional[str] = None) -> QASample:
        """One question of ``qtype`` (default: drawn from the seed) about one scene."""
        qtype = qtype or self.qtype_for(seed)
        if qtype not in BUILDERS:
            raise ValueError(f'unknown question type {qtype!r}')
        u = float(np.random.default_rng([int(seed), 23]).random())
        for attempt in range(MAX_ATTEMPTS):
            scene = self.render(seed, attempt)
            if qtype in OBJECT_QTYPES and object_issues(scene):
                continue
            rng = np.random.default_rng([int(seed), attempt, 17])
            qa = BUILDERS[qtype](scene, rng, u)
            if qa is not None:
                return QASample(scene.image, qa[0], qa[1], qtype, int(seed), scene)
        raise RuntimeError(f'seed {seed}: no clear-cut {qtype} question in '
                           f'{MAX_ATTEMPTS} scenes')

    def clear_scene(self, seed: int) -> tuple:
        """``(scene, clear)``: the first scene attempt whose objects are clear-cut.

        ``clear`` is False only if every attempt had issues (then the last is returned).
        """
        for attempt in range(MAX_ATTEMPTS):
            scene = self.render(seed, attempt)
            if not object_issues(scene):
                return scene, True
        return scene, False

    def ask_many(self, scene, seed: int, qtypes: Iterable[str] = QTYPES, salt: int = 0,
                 clear: bool = True) -> list:
        """Up to one question per entry of ``qtypes`` about a (clear-cut) scene.

        A type may be repeated to ask several of it; types with nothing clear to ask are
        skipped and duplicate questions dropped; object questions are skipped unless
        ``clear``. Returns ``[(qtype, question, answer), ...]``.
        """
        rng = np.random.default_rng([int(seed), int(salt), 19])
        out, seen = [], set()
        for t in qtypes:
            if t in OBJECT_QTYPES and not clear:
                continue
            qa = BUILDERS[t](scene, rng, float(rng.random()))
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                out.append((t, qa[0], qa[1]))
        return out

    def scene_questions(self, seed: int, qtypes: Iterable[str] = QTYPES) -> tuple:
        """One clear-cut scene and its questions (see :meth:`ask_many`): training data.

        Returns ``(scene, [(qtype, question, answer), ...])``.
        """
        scene, clear = self.clear_scene(seed)
        return scene, self.ask_many(scene, seed, qtypes, 0, clear)


def flip_scene(scene):
    """Mirror a scene left-right (image, mask and object boxes): a new valid scene."""
    w = scene.mask.shape[1]
    objects = [syn.SceneObject(o.kind, o.color, (w - o.box[2], o.box[1], w - o.box[0],
                                                 o.box[3]), o.distance)
               for o in scene.objects]
    return syn.Scene(np.ascontiguousarray(scene.image[:, ::-1]),
                     np.ascontiguousarray(scene.mask[:, ::-1]), objects, scene.seed)


def color_map(scene) -> np.ndarray:
    """Per-pixel object colour index (``COLORS`` order), ``len(COLORS)`` elsewhere.

    Painted far to near over each object's own class pixels in its box, so a nearer
    object wins where they overlap (as in the image).
    """
    out = np.full(scene.mask.shape, len(COLORS), np.uint8)
    for o in sorted(scene.objects, key=lambda o: -o.distance):
        x0, y0, x1, y1 = o.box
        own = scene.mask[y0:y1, x0:x1] == KIND_CLASS[o.kind]
        out[y0:y1, x0:x1][own] = COLORS.index(o.color)
    return out


# ---------------------------------------------------------------------------
# held-out evaluation


def heldout_seeds(n_per_type: int, base: int = HELDOUT_SEED_BASE) -> list:
    """``[(seed, qtype), ...]``: n per type, types interleaved, seeds from ``base``."""
    return [(base + i, QTYPES[i % len(QTYPES)]) for i in range(n_per_type * len(QTYPES))]


def heldout_samples(n_per_type: int, generator: Optional[SceneQAGenerator] = None,
                    base: int = HELDOUT_SEED_BASE):
    """Yield the held-out :class:`QASample` set (nominal image sizes by default)."""
    gen = generator or SceneQAGenerator()
    for seed, qtype in heldout_seeds(n_per_type, base):
        yield gen.sample(seed, qtype)


def score(qtypes: Sequence[str], predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact-match accuracy per question type and overall.

    Returns ``{'overall': acc, 'n': N, 'per_type': {qtype: {'n', 'correct',
    'accuracy'}}}``; overall is over all samples (= the mean of the per-type numbers
    when every type has the same count, as in :func:`heldout_seeds`).
    """
    if not len(qtypes) == len(predictions) == len(answers):
        raise ValueError('qtypes, predictions and answers differ in length')
    per = {}
    for t, p, a in zip(qtypes, predictions, answers):
        d = per.setdefault(t, {'n': 0, 'correct': 0})
        d['n'] += 1
        d['correct'] += int(is_correct(p, a))
    for d in per.values():
        d['accuracy'] = d['correct'] / d['n']
    total = sum(d['n'] for d in per.values())
    correct = sum(d['correct'] for d in per.values())
    ordered = {t: per[t] for t in QTYPES if t in per}
    return {'overall': correct / total if total else 0.0, 'n': total, 'per_type': ordered}


def evaluate(answer_fn: Callable, n_per_type: int = 100,
             generator: Optional[SceneQAGenerator] = None,
             base: int = HELDOUT_SEED_BASE) -> dict:
    """Score ``answer_fn(image_rgb, question) -> str`` on the held-out set.

    For any engine (PyTorch, the ONNX runtime); see :func:`score` for the result.
    """
    types, preds, answers = [], [], []
    for s in heldout_samples(n_per_type, generator, base):
        types.append(s.qtype)
        preds.append(answer_fn(s.image, s.question))
        answers.append(s.answer)
    return score(types, preds, answers)


def format_scores(result: dict) -> str:
    """Readable per-type table of a :func:`score` result."""
    rows = [f'{t:<10s} {d["accuracy"] * 100:6.1f}%  ({d["correct"]}/{d["n"]})'
            for t, d in result['per_type'].items()]
    rows.append(f'{"overall":<10s} {result["overall"] * 100:6.1f}%  (n={result["n"]})')
    return '\n'.join(rows)


# ---------------------------------------------------------------------------
# text corpus (tokenizer training)


def corpus() -> list:
    """Every question and answer string the generator can produce (sorted, unique)."""
    texts = set()
    objs = [object_phrase(k) for k in KINDS] + [object_phrase(k, c) for k in KINDS
                                                for c in COLORS]
    for x in objs:
        texts.update(t.format(x=x) for t in PRESENCE_TEMPLATES)
        for r in (SIDE_TEMPLATE, NEAR_FAR_TEMPLATE):
            texts.add(r.format(r=x))
        for y in objs:
            if x != y:
                texts.add(CLOSER_TEMPLATE.format(a=x, b=y))
        texts.add(f'the {x}')
    for p in PLURAL.values():
        texts.add(PRESENCE_ANY_TEMPLATE.format(p=p))
        texts.update(t.format(p=p) for t in COUNT_TEMPLATES)
    for k in KINDS:
        texts.add(_color_question(k, k))
        for ref in ORDER_REFS:
            for r in ('on the left', 'on the right') if ref.startswith('on the') else (ref,):
                texts.add(_color_question(k, order_phrase(k, r)))
    texts.update(LARGEST_TEMPLATES)
    texts.update(CAPTION_TEMPLATES)
    for a in COMPARE_REGIONS:
        for b in COMPARE_REGIONS:
            if a != b:
                texts.add(MORE_TEMPLATE.format(a=a, b=b))
    texts.update(REGION_NAMES.values())
    texts.update(COLORS)
    texts.update(('yes', 'no', 'left', 'right', 'near', 'far'))
    texts.update(str(i) for i in range(10))
    for nc in range(6):
        for nb in range(3):
            for npl in range(5):
                texts.add(caption_for({'car': nc, 'bus': nb, 'person': npl}))
    return sorted(texts)

"""Label sets: class names and palettes for Cityscapes (19 trainIds), ADE20K (150), custom.

Pure Python/numpy so the runtime and the nodes share them without torch.
"""
from dataclasses import dataclass

import numpy as np

IGNORE_ID = 255

# Cityscapes trainIds 0..18 with the official colours (cityscapesscripts' labels.py).
CITYSCAPES = (
    ('road', (128, 64, 128)), ('sidewalk', (244, 35, 232)), ('building', (70, 70, 70)),
    ('wall', (102, 102, 156)), ('fence', (190, 153, 153)), ('pole', (153, 153, 153)),
    ('traffic light', (250, 170, 30)), ('traffic sign', (220, 220, 0)),
    ('vegetation', (107, 142, 35)), ('terrain', (152, 251, 152)), ('sky', (70, 130, 180)),
    ('person', (220, 20, 60)), ('rider', (255, 0, 0)), ('car', (0, 0, 142)),
    ('truck', (0, 0, 70)), ('bus', (0, 60, 100)), ('train', (0, 80, 100)),
    ('motorcycle', (0, 0, 230)), ('bicycle', (119, 11, 32)),
)

# Cityscapes labelIds (gtFine_labelIds.png) -> trainIds; every other id is ignored.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# ADE20K SceneParsing (ADEChallengeData2016) 150 classes, in annotation order 1..150
# (trained as 0..149 after reduce-zero-label).
ADE20K_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror',
    'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door',
    'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower',
    'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman',
    'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt',
    'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan',
    'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag',
)


def distinct_palette(n, seed=0):
    """Return n well-separated RGB colours (deterministic; used where no official palette)."""
    rng = np.random.default_rng(seed)
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    sat = 0.55 + 0.4 * rng.random(n)
    val = 0.6 + 0.4 * rng.random(n)
    i = np.floor(hues * 6).astype(int) % 6
    f = hues * 6 - np.floor(hues * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    table = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    rgb = np.stack([np.choose(i, [c[k] for c in table]) for k in range(3)], axis=1)
    return [tuple(int(v) for v in row) for row in np.round(rgb * 255)]


@dataclass(frozen=True)
class LabelSet:
    """Names and colours of the classes a model predicts (index = class id)."""

    name: str
    names: tuple
    colors: tuple

    def __post_init__(self):
        if len(self.names) != len(self.colors):
            raise ValueError(f'label set {self.name}: {len(self.names)} names but '
                             f'{len(self.colors)} colours')

    @property
    def num_classes(self):
        return len(self.names)

    def palette(self):
        """Return a (256 or more, 3) uint8 lookup table; unknown ids are black."""
        lut = np.zeros((max(256, self.num_classes), 3), np.uint8)
        lut[:self.num_classes] = np.asarray(self.colors, np.uint8)
        return lut


def get_label_set(name, num_classes=None, names=None):
    """Return a LabelSet by name ('cityscapes', 'ade20k') or a custom one from names.

    With name 'custom' (or any other name), `names` gives the classes; without names,
    `num_classes` generic names 'class_<i>' are made.
    """
    if name == 'cityscapes':
        ls = LabelSet('cityscapes', tuple(n for n, _ in CITYSCAPES),
                      tuple(c for _, c in CITYSCAPES))
    elif name == 'ade20k':
        ls = LabelSet('ade20k', ADE20K_NAMES, tuple(distinct_palette(150, seed=150)))
    else:
        if names is None:
            if not num_classes:
                raise ValueError(f'custom label set {name!r} needs names or num_classes')
            names = [f'class_{i}' for i in range(num_classes)]
        ls = LabelSet(name, tuple(names), tuple(distinct_palette(len(names))))
    if num_classes is not None and ls.num_classes != num_classes:
        raise ValueError(f'label set {name!r} has {ls.num_classes} classes but the model '
                         f'predicts {num_classes}: pick the label set the model was trained on')
    return ls


def cityscapes_label_to_train_lut():
    """Return a 256-entry uint8 LUT mapping Cityscapes labelIds to trainIds (else 255)."""
    lut = np.full(256, IGNORE_ID, np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut

"""Dataset readers (numpy + opencv): Cityscapes, ADE20K and the synthetic street scenes.

Each dataset is indexable and returns (RGB uint8 HxWx3, label uint8 HxW) with labels in
training ids (255 = ignore), so training and evaluation share one code path.
"""
import glob
import os

import cv2
import numpy as np

from bluelm_ros.runtime.labels import cityscapes_label_to_train_lut, IGNORE_ID
from bluelm_ros.data.synthetic import StreetSceneGenerator


def _read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f'cannot read image {path}')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_label(path):
    lab = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if lab is None:
        raise FileNotFoundError(f'cannot read label {path}')
    return lab


class CityscapesDataset:
    """Cityscapes (leftImg8bit + gtFine labelIds mapped to the 19 trainIds).

    Layout: leftImg8bit/<split>/<city>/*_leftImg8bit.png and
    gtFine/<split>/<city>/*_gtFine_labelIds.png.
    """

    num_classes = 19
    label_set = 'cityscapes'

    def __init__(self, root, split='val'):
        self.images = sorted(glob.glob(os.path.join(root, 'leftImg8bit', split, '*',
                                                    '*_leftImg8bit.png')))
        if not self.images:
            raise FileNotFoundError(f'no Cityscapes images under {root}/leftImg8bit/{split}')
        self.labels = [p.replace(os.sep + 'leftImg8bit' + os.sep, os.sep + 'gtFine' + os.sep)
                       .replace('_leftImg8bit.png', '_gtFine_labelIds.png')
                       for p in self.images]
        self.lut = cityscapes_label_to_train_lut()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _read_rgb(self.images[i]), self.lut[_read_label(self.labels[i])]


class ADE20KDataset:
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes, reduce-zero-label.

    Layout: images/<training|validation>/*.jpg and annotations/<...>/*.png;
    label 0 (other) -> 255 (ignore), k -> k - 1.
    """

    num_classes = 150
    label_set = 'ade20k'

    def __init__(self, root, split='validation'):
        self.images = sorted(glob.glob(os.path.join(root, 'images', split, '*.jpg')))
        if not self.images:
            raise FileNotFoundError(f'no ADE20K images under {root}/images/{split}')
        self.labels = [os.path.join(root, 'annotations', split,
                                    os.path.basename(p)[:-4] + '.png') for p in self.images]
        self.lut = np.arange(256, dtype=np.int32) - 1
        self.lut[0] = IGNORE_ID
        self.lut = np.where(self.lut == 254, IGNORE_ID, self.lut).astype(np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _read_rgb(self.images[i]), self.lut[_read_label(self.labels[i])]


class SyntheticStreetDataset:
    """Synthetic street scenes; item i is the scene of seed `offset + i`.

    Training uses offset 0, validation a disjoint range (offset 10**6).
    """

    num_classes = 19
    label_set = 'cityscapes'

    def __init__(self, length, height=480, width=640, offset=0):
        self.length, self.offset = int(length), int(offset)
        self.gen = StreetSceneGenerator(height, width)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        scene = self.gen.render(self.offset + i)
        return scene.image, scene.mask


VAL_OFFSET = 10 ** 6


def open_dataset(kind, root=None, split=None, length=200, height=480, width=640):
    """Open 'cityscapes', 'ade20k' (need root) or 'synthetic' (train or val split)."""
    if kind == 'cityscapes':
        return CityscapesDataset(root, split or 'val')
    if kind == 'ade20k':
        return ADE20KDataset(root, split or 'validation')
    if kind == 'synthetic':
        offset = VAL_OFFSET if (split or 'val') == 'val' else 0
        return SyntheticStreetDataset(length, height, width, offset)
    raise ValueError(f'unknown dataset {kind!r} (cityscapes, ade20k, synthetic)')

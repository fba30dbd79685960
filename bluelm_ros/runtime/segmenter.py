"""DSNet runtime: numpy + onnxruntime + opencv, no torch.

`Segmenter` takes an image of any size (mono, RGB/BGR, RGBA/BGRA; uint8 or uint16),
resizes it to the static input size of the exported model, normalizes it exactly as the
official DSNet preprocessing does (RGB, /255, ImageNet mean/std), runs ONNX Runtime and
returns the class-id mask at the input size.
"""
from dataclasses import dataclass
import os
import time

import cv2
import numpy as np

from bluelm_ros.runtime.image import ImageError, to_rgb_uint8
from bluelm_ros.runtime.ort_session import create_session, metadata, ModelFileError
from bluelm_ros.runtime.labels import get_label_set

# Keys the exporter writes into the ONNX metadata; a model without them was not made by
# `bluelm-ros dsnet-export` and could pair the wrong head with the wrong labels.
REQUIRED_META = ('bluelm_ros.kind', 'dsnet.variant', 'dsnet.num_classes', 'dsnet.input_height',
                 'dsnet.input_width', 'dsnet.label_set')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPORT_HINT = ('Export one with `bluelm-ros dsnet-export` (official checkpoint -> ONNX) or '
               'use the shipped default (model_path empty).')


@dataclass
class SegmentationResult:
    """A class-id mask at the input size, plus how long the model took."""

    mask: np.ndarray
    model_ms: float
    total_ms: float


def normalize(rgb, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize RGB uint8 to (h, w) = size and return the 1x3xHxW float32 model input."""
    h, w = size
    if rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    # One multiply-add per channel straight into the CHW buffer: (x / 255 - mean) / std
    # without HWC float temporaries (6x faster than the naive form at 640x480).
    scale = 1.0 / (255.0 * np.asarray(std, np.float64))
    bias = -np.asarray(mean, np.float64) / np.asarray(std, np.float64)
    out = np.empty((1, 3, h, w), np.float32)
    for c in range(3):
        np.multiply(rgb[:, :, c], np.float32(scale[c]), out=out[0, c])
        out[0, c] += np.float32(bias[c])
    return out


class Segmenter:
    """Run an exported DSNet ONNX model on images."""

    def __init__(self, model_path, providers=None, threads=0, label_set=None,
                 class_names=None, spinning=False):
        # spinning: ORT's pool threads busy-wait between operators instead of sleeping
        # (lower latency per frame, but the spin steals cores from other work)
        self.model_path = os.fspath(model_path)
        self.session, self.provider_warnings = create_session(
            self.model_path, providers, fix_hint=EXPORT_HINT, threads=threads,
            spinning=spinning)
        meta = metadata(self.session)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing or meta.get('bluelm_ros.kind') != 'dsnet':
            raise ModelFileError(
                f'{self.model_path} is not a bluelm_ros DSNet export (metadata missing: '
                f'{", ".join(missing) or "bluelm_ros.kind=dsnet"}). {EXPORT_HINT}')
        self.meta = meta
        self.variant = meta['dsnet.variant']
        self.num_classes = int(meta['dsnet.num_classes'])
        self.input_size = (int(meta['dsnet.input_height']), int(meta['dsnet.input_width']))
        self.precision = meta.get('dsnet.precision', 'fp32')
        name = label_set or meta['dsnet.label_set']
        names = class_names or (meta['dsnet.class_names'].split('|')
                                if meta.get('dsnet.class_names') else None)
        try:
            self.labels = get_label_set(name, self.num_classes, names)
        except ValueError as exc:
            raise ModelFileError(f'{self.model_path}: {exc}') from exc
        inp = self.session.get_inputs()[0]
        if list(inp.shape[2:]) != list(self.input_size):
            raise ModelFileError(f'{self.model_path}: input shape {inp.shape} does not match '
                                 f'its metadata size {self.input_size}')
        self.input_name = inp.name
        outputs = [o.name for o in self.session.get_outputs()]
        self.mask_output = 'mask' if 'mask' in outputs else None
        self.providers = self.session.get_providers()

    def logits(self, image, color_order='rgb'):
        """Return the raw model output, 1 x classes x H x W at the model input size."""
        x = normalize(to_rgb_uint8(image, color_order), self.input_size)
        return self.session.run(['logits'], {self.input_name: x})[0]

    def segment(self, image, color_order='rgb'):
        """Return a SegmentationResult whose mask has the input image's height and width."""
        t0 = time.perf_counter()
        rgb = to_rgb_uint8(image, color_order)
        x = normalize(rgb, self.input_size)
        t1 = time.perf_counter()
        if self.mask_output:
            mask = self.session.run([self.mask_output], {self.input_name: x})[0][0]
        else:
            mask = self.session.run(['logits'], {self.input_name: x})[0][0].argmax(0)
        t2 = time.perf_counter()
        mask = mask.astype(np.uint8 if self.num_classes <= 256 else np.uint16, copy=False)
        h, w = rgb.shape[:2]
        if mask.shape != (h, w):
            # Nearest keeps class ids valid; the model already upsampled to its input size.
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        t3 = time.perf_counter()
        return SegmentationResult(mask, (t2 - t1) * 1e3, (t3 - t0) * 1e3)

    def __call__(self, image, color_order='rgb'):
        return self.segment(image, color_order).mask

    def colorize(self, mask):
        """Return the RGB colour mask for a class-id mask."""
        return colorize(mask, self.labels.palette())

    def class_stats(self, mask):
        """Return [(class_id, name, pixel_share)] for the classes present, largest first."""
        return class_stats(mask, self.labels.names)


def colorize(mask, palette):
    """Map class ids to RGB with a (N, 3) uint8 palette."""
    return palette[mask]


def overlay(rgb, color_mask, alpha=0.5):
    """Blend a colour mask over an RGB image (alpha = mask weight)."""
    if rgb.shape != color_mask.shape:
        raise ImageError(f'overlay: image {rgb.shape} and mask {color_mask.shape} differ')
    return cv2.addWeighted(color_mask, float(alpha), rgb, 1.0 - float(alpha), 0.0)


def class_stats(mask, names):
    """Return [(class_id, name, share)] sorted by descending pixel share."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    total = max(int(mask.size), 1)
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind='stable')]
    return [(int(c), names[c] if c < len(names) else f'class_{c}', counts[c] / total)
            for c in order]

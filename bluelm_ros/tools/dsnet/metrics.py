"""Segmentation metrics (numpy): confusion matrix, per-class IoU, mIoU, pixel agreement."""
import numpy as np

from bluelm_ros.runtime.labels import IGNORE_ID


def confusion_matrix(pred, target, num_classes, ignore_id=IGNORE_ID):
    """Return the (num_classes x num_classes) count matrix, rows = target, cols = pred."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f'prediction and target sizes differ: {pred.shape} vs {target.shape}')
    keep = (target != ignore_id) & (target < num_classes) & (pred < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(conf):
    """Return IoU per class (NaN for classes absent from both target and prediction)."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf):
    """Return the mean IoU over classes that occur (as the official evaluation does)."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float('nan')


def pixel_accuracy(conf):
    conf = np.asarray(conf, np.float64)
    return float(np.trace(conf) / max(conf.sum(), 1.0))


def agreement(mask_a, mask_b):
    """Fraction of pixels where two masks give the same class."""
    return float((np.asarray(mask_a) == np.asarray(mask_b)).mean())


def format_report(conf, names):
    """Return a text table of per-class IoU and the mIoU."""
    iou = iou_per_class(conf)
    lines = [f'{"class":<16} {"IoU":>7}']
    for name, v in zip(names, iou):
        if np.isfinite(v):
            lines.append(f'{name:<16} {100 * v:7.2f}')
    lines.append(f'{"mIoU":<16} {100 * mean_iou(conf):7.2f}')
    lines.append(f'{"pixel acc":<16} {100 * pixel_accuracy(conf):7.2f}')
    return '\n'.join(lines)

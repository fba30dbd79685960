"""Evaluate an exported DSNet ONNX model with the runtime (no torch): IoU, mIoU, confusion."""
import json
import os

import numpy as np
from tqdm import tqdm

from bluelm_ros.data.datasets import open_dataset
from bluelm_ros.tools.dsnet.metrics import (confusion_matrix, format_report, iou_per_class,
                                            mean_iou, pixel_accuracy)
from bluelm_ros.runtime.segmenter import Segmenter


def evaluate(segmenter, dataset, limit=None, progress=True):
    """Return the confusion matrix of a Segmenter over a dataset."""
    n = len(dataset) if not limit else min(limit, len(dataset))
    k = segmenter.num_classes
    conf = np.zeros((k, k), np.int64)
    for i in tqdm(range(n), desc='dsnet-eval', disable=not progress):
        img, lab = dataset[i]
        conf += confusion_matrix(segmenter(img), lab, k)
    return conf


def summary(conf, names):
    iou = iou_per_class(conf)
    return {'mIoU': mean_iou(conf), 'pixel_accuracy': pixel_accuracy(conf),
            'iou': {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, iou)},
            'confusion': conf.tolist()}


def add_arguments(p):
    p.add_argument('models', nargs='+', help='exported .onnx model(s)')
    p.add_argument('--dataset', default='synthetic',
                   choices=['synthetic', 'cityscapes', 'ade20k'])
    p.add_argument('--data-root')
    p.add_argument('--split')
    p.add_argument('--limit', type=int, default=100, help='images (synthetic: scenes)')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--json', help='write the results here')


def run(args):
    results = {}
    for path in args.models:
        seg = Segmenter(path, threads=args.threads)
        data = open_dataset(args.dataset, args.data_root, args.split, length=args.limit)
        conf = evaluate(seg, data, args.limit)
        print(f'\n{os.path.basename(path)} ({seg.variant}, {seg.precision}) on {args.dataset}')
        print(format_report(conf, seg.labels.names))
        results[path] = summary(conf, seg.labels.names)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return 0

"""DSNet speed: PyTorch eager FP32 vs our ONNX Runtime FP32 vs INT8, same weights, 2 threads.

Interleaved (``harness.interleaved``): eager (BatchNorm folded into the convs, as ORT's
optimizer and the official inference code do), ORT FP32, ORT INT8 and INT8 end to end
(resize + normalise + model) take turns, >= 5 rounds, min and median reported.

Run: `python bench/bench_dsnet.py` (after `source .ws/env.sh`). Prints a table, saves
bench/results/dsnet.json and dsnet.png. Models: the shipped dsnet_tiny (trained weights)
and the official dsnet_head128 layout (random weights with calibrated BatchNorm stats: its
speed is what matters; agreement on random weights is reported but not meaningful).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, machine, plot_path, save  # noqa: E402
import harness  # noqa: E402

from bluelm_ros.data.datasets import SyntheticStreetDataset  # noqa: E402
from bluelm_ros.runtime import shipped_models  # noqa: E402
from bluelm_ros.runtime.segmenter import normalize, Segmenter  # noqa: E402
from bluelm_ros.tools.dsnet.checkpoint import load_dsnet  # noqa: E402
from bluelm_ros.tools.dsnet.export import export_onnx, quantize_int8  # noqa: E402
from bluelm_ros.tools.dsnet.fold import fold_batchnorm  # noqa: E402
from bluelm_ros.tools.dsnet.model import DSNet  # noqa: E402

CKPT = os.path.join(shipped_models.MODELS_DIR, 'dsnet',
                    'dsnet_tiny_synthetic.pth.tar')


def model_for(variant):
    if variant == 'dsnet_tiny':
        return load_dsnet(CKPT, 'dsnet_tiny', 19)
    torch.manual_seed(0)
    model = DSNet(variant, 19)
    model.train()  # a few forward passes give BatchNorm realistic running statistics
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 256, 256))
    return model.eval()


def bench_one(variant, size, threads, rounds, images):
    h, w = size
    model = model_for(variant)
    # BN folded on both sides: ORT's optimizer folds it, so eager must too (the official
    # code times its models with BN removed the same way)
    eager_model, folded = fold_batchnorm(model, torch.zeros(1, 3, h, w))
    os.makedirs(CACHE, exist_ok=True)
    fp32 = os.path.join(CACHE, f'{variant}_{h}x{w}_fp32.onnx')
    int8 = os.path.join(CACHE, f'{variant}_{h}x{w}_int8.onnx')
    export_onnx(model, fp32, variant, 19, h, w)
    quantize_int8(fp32, int8, images[:32])
    x = normalize(images[0], size)
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    seg32, seg8 = Segmenter(fp32, threads=threads), Segmenter(int8, threads=threads)
    seg8_spin = Segmenter(int8, threads=threads, spinning=True)  # the node's `spinning`

    def eager():
        with torch.no_grad():
            eager_model(xt).argmax(1)

    comp = harness.interleaved({
        'torch eager fp32 (BN folded)': eager,
        'ORT fp32': lambda: seg32.session.run(['mask'], {'image': x}),
        'ORT int8': lambda: seg8.session.run(['mask'], {'image': x}),
        'ORT int8 spinning': lambda: seg8_spin.session.run(['mask'], {'image': x}),
        'ORT int8 end to end': lambda: seg8.segment(images[1]),
    }, rounds=rounds, calls=2, warmup=1)
    agree_torch, agree_int8 = [], []
    for img in images[:4]:
        xi = normalize(img, size)
        with torch.no_grad():
            ref = model(torch.from_numpy(xi)).argmax(1)[0].numpy()
        m32 = seg32.session.run(['mask'], {'image': xi})[0][0]
        m8 = seg8.session.run(['mask'], {'image': xi})[0][0]
        agree_torch.append(float((m32 == ref).mean()))
        agree_int8.append(float((m8 == m32).mean()))
    speed = comp.to_dict()['speedup_vs_reference']
    row = {'variant': variant, 'size': f'{h}x{w}', 'weights': 'trained (synthetic)'
           if variant == 'dsnet_tiny' else 'random (calibrated BN)',
           'bn_folded_in_eager': folded, 'timing': comp.to_dict(),
           'speedup_ort_fp32': speed['ORT fp32']['median_of_rounds'],
           'speedup_ort_int8': speed['ORT int8']['median_of_rounds'],
           'speedup_ort_int8_spinning': speed['ORT int8 spinning']['median_of_rounds'],
           'argmax_agreement_ort_fp32_vs_torch': float(np.mean(agree_torch)),
           'pixel_agreement_int8_vs_fp32': float(np.mean(agree_int8)),
           'file_mb': {'fp32': os.path.getsize(fp32) / 2**20,
                       'int8': os.path.getsize(int8) / 2**20}}
    print(f'--- {variant} {h}x{w} ({folded} BN folded into eager convs)')
    print(comp.table())
    print(f"argmax FP32 vs torch {100 * row['argmax_agreement_ort_fp32_vs_torch']:.2f}% | "
          f"INT8 vs FP32 {100 * row['pixel_agreement_int8_vs_fp32']:.2f}%", flush=True)
    return row, comp


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--variants', default='dsnet_tiny,dsnet_head128')
    p.add_argument('--sizes', default='480x640,512x1024')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--strict', action='store_true',
                   help='exit 1 if a run is flagged (rounds disagree or the machine was busy)')
    args = p.parse_args()
    data = SyntheticStreetDataset(40, offset=3 * 10 ** 6)
    images = [data[i][0] for i in range(len(data))]
    rows, comps = [], {}
    for variant in args.variants.split(','):
        for size in args.sizes.split(','):
            h, w = map(int, size.split('x'))
            row, comp = bench_one(variant, (h, w), args.threads, args.rounds, images)
            rows.append(row)
            comps[f'{variant}\n{size}'] = comp
    flags = [f for c in comps.values() for f in c.flags]
    save('dsnet', {'machine': machine(), 'threads': args.threads, 'rows': rows,
                   'flagged': bool(flags)})
    harness.plot_comparisons(comps, plot_path('dsnet'),
                             'DSNet on CPU, same weights, interleaved (2 threads, batch 1)')
    if flags and args.strict:
        sys.exit('flagged run: ' + '; '.join(flags))


if __name__ == '__main__':
    main()

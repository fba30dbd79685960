"""DSNet speed: PyTorch eager FP32 vs our ONNX Runtime FP32 vs INT8, same weights, 2 threads.

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
from common import CACHE, machine, plot_path, save, summarize, time_it  # noqa: E402

from bluelm_ros.data.datasets import SyntheticStreetDataset  # noqa: E402
from bluelm_ros.runtime import shipped_models  # noqa: E402
from bluelm_ros.runtime.segmenter import normalize, Segmenter  # noqa: E402
from bluelm_ros.tools.dsnet.checkpoint import load_dsnet  # noqa: E402
from bluelm_ros.tools.dsnet.export import export_onnx, quantize_int8  # noqa: E402
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


def bench_one(variant, size, threads, repeat, images):
    h, w = size
    model = model_for(variant)
    os.makedirs(CACHE, exist_ok=True)
    fp32 = os.path.join(CACHE, f'{variant}_{h}x{w}_fp32.onnx')
    int8 = os.path.join(CACHE, f'{variant}_{h}x{w}_int8.onnx')
    export_onnx(model, fp32, variant, 19, h, w)
    quantize_int8(fp32, int8, images[:32])
    x = normalize(images[0], size)
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        eager = time_it(lambda: model(xt), repeat)
    seg32, seg8 = Segmenter(fp32, threads=threads), Segmenter(int8, threads=threads)
    ort32 = time_it(lambda: seg32.session.run(['mask'], {'image': x}), repeat)
    ort8 = time_it(lambda: seg8.session.run(['mask'], {'image': x}), repeat)
    e2e8 = time_it(lambda: seg8.segment(images[1]), repeat)
    agree_torch, agree_int8 = [], []
    for img in images[:4]:
        xi = normalize(img, size)
        with torch.no_grad():
            ref = model(torch.from_numpy(xi)).argmax(1)[0].numpy()
        m32 = seg32.session.run(['mask'], {'image': xi})[0][0]
        m8 = seg8.session.run(['mask'], {'image': xi})[0][0]
        agree_torch.append(float((m32 == ref).mean()))
        agree_int8.append(float((m8 == m32).mean()))
    row = {'variant': variant, 'size': f'{h}x{w}', 'weights': 'trained (synthetic)'
           if variant == 'dsnet_tiny' else 'random (calibrated BN)',
           'torch_eager_fp32': summarize(eager), 'ort_fp32': summarize(ort32),
           'ort_int8': summarize(ort8), 'ort_int8_end_to_end': summarize(e2e8),
           'argmax_agreement_ort_fp32_vs_torch': float(np.mean(agree_torch)),
           'pixel_agreement_int8_vs_fp32': float(np.mean(agree_int8)),
           'file_mb': {'fp32': os.path.getsize(fp32) / 2**20,
                       'int8': os.path.getsize(int8) / 2**20}}
    base = row['torch_eager_fp32']['median_ms']
    row['speedup_ort_fp32'] = base / row['ort_fp32']['median_ms']
    row['speedup_ort_int8'] = base / row['ort_int8']['median_ms']
    print(f"{variant:>14} {h}x{w:<5} eager {base:8.1f} ms | ORT fp32 "
          f"{row['ort_fp32']['median_ms']:7.1f} ms ({row['speedup_ort_fp32']:.2f}x) | ORT int8 "
          f"{row['ort_int8']['median_ms']:7.1f} ms ({row['speedup_ort_int8']:.2f}x) | argmax "
          f"{100 * row['argmax_agreement_ort_fp32_vs_torch']:.2f}% | int8 agree "
          f"{100 * row['pixel_agreement_int8_vs_fp32']:.2f}%", flush=True)
    return row


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = [f"{r['variant']}\n{r['size']}" for r in rows]
    keys = [('torch_eager_fp32', 'PyTorch eager FP32'), ('ort_fp32', 'ORT FP32'),
            ('ort_int8', 'ORT INT8')]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (k, name) in enumerate(keys):
        fps = [1000 / r[k]['median_ms'] for r in rows]
        ax.bar(x + (i - 1) * 0.27, fps, 0.27, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel('frames / s (2 threads, batch 1)')
    ax.set_title('DSNet on CPU: same weights, three runtimes')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--variants', default='dsnet_tiny,dsnet_head128')
    p.add_argument('--sizes', default='480x640,512x1024')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeat', type=int, default=5)
    args = p.parse_args()
    data = SyntheticStreetDataset(40, offset=3 * 10 ** 6)
    images = [data[i][0] for i in range(len(data))]
    rows = []
    for variant in args.variants.split(','):
        for size in args.sizes.split(','):
            h, w = map(int, size.split('x'))
            rows.append(bench_one(variant, (h, w), args.threads, args.repeat, images))
    save('dsnet', {'machine': machine(), 'threads': args.threads, 'rows': rows})
    plot(rows, plot_path('dsnet'))


if __name__ == '__main__':
    main()

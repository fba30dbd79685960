"""Open VLMs at real SmolVLM shapes: this project's runtime vs transformers eager.

What a user of SmolVLM-256M/500M-Instruct would otherwise run is transformers eager
(FP32, ``generate``). Both sides get the same random weights at the real shapes
(``test/hf_vlm_fixtures.SMOLVLM_SHAPES``: SigLIP-B/16 at 512 px, SmolLM2-135M / 360M,
a 640x480 frame resized to a 2048 px longest edge: 12 tiles + the global image, 832
image tokens), 2 threads, the same frame and question:

* ``transformers``: processor + ``generate`` (greedy, 16 new tokens forced);
* ``ours fp32``: the FP32 bundle (tokens identical to transformers, tested);
* ``ours int8/int4``: the deployment bundle (INT8 vision, INT4 decoder);
* ``ours int8/int4 pre-encoded``: the frame encoded and its prefix prefilled when it
  arrived (``VLMEngine.prepare``); the question pays only for its own tokens.

Every call answers a new frame (or, pre-encoded, a new question) with 16 tokens; the
contenders take turns (``harness.interleaved``), and each call's time to first token,
image encode time and decode rate are kept. Peak RSS: each contender alone in a fresh
process doing one answer. Nothing is downloaded: checkpoints are built with transformers
and exported once into ``~/.cache/bluelm_ros/bench/open_vlm``.

Run: ``python bench/bench_open_vlm.py [--shapes smolvlm-256m,smolvlm-500m]`` (after
``source .ws/env.sh``); ``--prepare`` only builds the checkpoints and bundles. Results:
``bench/results/open_vlm.json`` and ``open_vlm.png``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'test'))
from common import CACHE, machine, plot_path, save  # noqa: E402
import harness  # noqa: E402

ROOT = os.path.join(CACHE, 'open_vlm')
QUESTION = 'What is in the image? Describe it.'
# pre-encoded calls vary the question's first word so no call reuses the last one's tokens
OPENERS = ('What', 'Which', 'Where', 'Describe', 'Is', 'Count')
NEW_TOKENS = 16
CONTENDERS = ('transformers', 'ours fp32', 'ours int8/int4', 'ours int8/int4 pre-encoded')


def paths(shape):
    base = os.path.join(ROOT, shape)
    return {k: os.path.join(base, k) for k in ('hf', 'converted', 'bundle')}


def prepare(shape):
    """Build the random checkpoint (transformers), convert it, export FP32 + INT8/INT4."""
    p = paths(shape)
    done = os.path.join(p['bundle'], 'manifest.json')
    if os.path.exists(done):
        return p
    import hf_vlm_fixtures as fixtures
    from bluelm_ros.tools.vlm.convert import convert
    from bluelm_ros.tools.vlm.export import ExportOptions, export_bundle
    from bluelm_ros.tools.vlm.modeling import BlueLMV
    t = time.time()
    if not os.path.exists(os.path.join(p['hf'], 'config.json')):
        fixtures.build_idefics3_family(p['hf'], smolvlm=True, seed=0, shape=shape)
    convert('idefics3', p['hf'], p['converted'])
    export_bundle(BlueLMV.from_pretrained(p['converted']), p['bundle'],
                  ExportOptions(vision=('fp32', 'int8'), decoder=('fp32', 'int4')),
                  tokenizer_dir=p['converted'])
    print(f'{shape}: checkpoint + bundle in {time.time() - t:.0f} s', flush=True)
    return p


def frame():
    import hf_vlm_fixtures as fixtures
    return fixtures.photos()['frame640x480']


class Transformers:
    """processor + eager generate; vision time from hooks on the vision tower."""

    def __init__(self, hf_dir, threads):
        import torch
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration
        torch.set_num_threads(threads)
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(hf_dir)
        self.model = Idefics3ForConditionalGeneration.from_pretrained(
            hf_dir, attn_implementation='eager').eval()
        msgs = [{'role': 'user', 'content': [{'type': 'image'},
                                             {'type': 'text', 'text': QUESTION}]}]
        self.prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        self.marks = {}
        vision = self.model.model.vision_model
        vision.register_forward_pre_hook(lambda *a: self._mark('v0'))
        vision.register_forward_hook(lambda *a: self._mark('v1'))

    def _mark(self, key):
        self.marks[key] = time.perf_counter()

    def answer(self, rgb, question=None):
        from PIL import Image
        from transformers import LogitsProcessor, LogitsProcessorList
        stamps = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        t0 = time.perf_counter()
        inputs = self.processor(text=self.prompt, images=[Image.fromarray(rgb)],
                                return_tensors='pt')
        with self.torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, logits_processor=LogitsProcessorList([Stamp()]))
        end = time.perf_counter()
        return {'ttft_ms': (stamps[0] - t0) * 1e3,
                'encode_ms': (self.marks['v1'] - self.marks['v0']) * 1e3,
                'decode_tok_s': (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                'total_ms': (end - t0) * 1e3}


class Ours:
    """VLMEngine on the exported bundle."""

    def __init__(self, bundle, vision, decoder, threads, pre_encoded=False):
        from bluelm_ros.runtime.vlm.engine import VLMEngine
        self.engine = VLMEngine(bundle, vision, decoder, threads=threads)
        self.pre_encoded, self.calls = pre_encoded, 0

    def answer(self, rgb, question=None):
        self.calls += 1
        key = f'frame-{self.calls}'
        kw = dict(max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        if self.pre_encoded:
            if self.engine.cached_image('pre') is None:
                self.engine.prepare(rgb, image_key='pre')
            opener = OPENERS[self.calls % len(OPENERS)]
            res = self.engine.generate(f'{opener} {QUESTION}', image_key='pre', **kw)
        else:
            res = self.engine.generate(QUESTION, image=rgb, image_key=key, reuse_prefix=False,
                                       **kw)
        tm = res.timings
        assert len(res.tokens) == NEW_TOKENS, res.stop_reason
        return {'ttft_ms': tm.time_to_first_token_ms, 'encode_ms': tm.image_encode_ms,
                'decode_tok_s': tm.tokens_per_second,
                'total_ms': tm.time_to_first_token_ms + tm.decode_ms}


def make(name, shape, threads):
    p = paths(shape)
    if name == 'transformers':
        return Transformers(p['hf'], threads)
    if name == 'ours fp32':
        return Ours(p['bundle'], 'fp32', 'fp32', threads)
    return Ours(p['bundle'], 'int8', 'int4', threads, pre_encoded=name.endswith('pre-encoded'))


def peak_rss(shape, name, threads):
    """Peak RSS (MiB) of a fresh process that loads ``name`` and answers once."""
    out = subprocess.run([sys.executable, __file__, '--rss-child', name, '--shapes', shape,
                          '--threads', str(threads)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_rss_mb']


def rss_child(name, shape, threads):
    runner = make(name, shape, threads)
    runner.answer(frame())
    with open('/proc/self/status') as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    print(json.dumps({'peak_rss_mb': hwm / 1024}))


def bench_shape(shape, threads, rounds):
    rgb = frame()
    runners = {n: make(n, shape, threads) for n in CONTENDERS}
    metrics = {n: [] for n in CONTENDERS}

    def call(name):
        return lambda: metrics[name].append(runners[name].answer(rgb))

    comp = harness.interleaved({n: call(n) for n in CONTENDERS}, reference='transformers',
                               rounds=rounds, calls=1, warmup=1)
    for n in CONTENDERS:  # the warm-up call is not a measurement
        metrics[n] = metrics[n][1:]
    print(f'--- {shape}: whole answer ({NEW_TOKENS} tokens), interleaved')
    print(comp.table())
    row = {'shape': shape, 'whole_answer': comp.to_dict(), 'per_call': {}}
    for n in CONTENDERS:
        m = metrics[n]
        row['per_call'][n] = {
            k: {'min': min(x[k] for x in m), 'median': statistics.median(x[k] for x in m)}
            for k in ('ttft_ms', 'encode_ms', 'decode_tok_s', 'total_ms')}
    runners.clear()  # free the models before the RSS children run
    row['peak_rss_mb'] = {n: peak_rss(shape, n, threads) for n in CONTENDERS
                          if not n.endswith('pre-encoded')}
    med = {n: row['per_call'][n] for n in CONTENDERS}
    tr = med['transformers']
    row['vs_transformers'] = {
        n: {'ttft': tr['ttft_ms']['median'] / med[n]['ttft_ms']['median'],
            'decode': med[n]['decode_tok_s']['median'] / tr['decode_tok_s']['median'],
            'rss': (row['peak_rss_mb'].get(n, float('nan'))
                    / row['peak_rss_mb']['transformers'])}
        for n in CONTENDERS if n != 'transformers'}
    for n in CONTENDERS:
        pc = row['per_call'][n]
        print(f'{n:<28} ttft {pc["ttft_ms"]["median"]:8.0f} ms  encode '
              f'{pc["encode_ms"]["median"]:8.0f} ms  decode {pc["decode_tok_s"]["median"]:6.1f}'
              f' tok/s  peak RSS {row["peak_rss_mb"].get(n, float("nan")):7.0f} MiB')
    return row, comp


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, [('ttft_ms', 'time to first token, ms'),
                                       ('decode_tok_s', 'decode tokens/s'),
                                       ('peak_rss_mb', 'peak RSS, MiB')]):
        x = np.arange(len(rows))
        width = 0.8 / len(CONTENDERS)
        for i, n in enumerate(CONTENDERS):
            if key == 'peak_rss_mb':
                vals = [r['peak_rss_mb'].get(n, np.nan) for r in rows]
            else:
                vals = [r['per_call'][n][key]['median'] for r in rows]
            ax.bar(x + (i - 1.5) * width, vals, width, label=n)
        ax.set_xticks(x, [r['shape'] for r in rows])
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle('SmolVLM shapes, random weights, 640x480 frame, 2 threads (medians)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--shapes', default='smolvlm-256m,smolvlm-500m')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--prepare', action='store_true', help='build and export only')
    ap.add_argument('--rss-child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = args.shapes.split(',')
    if args.rss_child:
        return rss_child(args.rss_child, shapes[0], args.threads)
    for s in shapes:
        prepare(s)
    if args.prepare:
        return None
    rows, comps = [], {}
    for s in shapes:
        row, comp = bench_shape(s, args.threads, args.rounds)
        rows.append(row)
        comps[s] = comp
    save('open_vlm', {'machine': machine(), 'threads': args.threads, 'new_tokens': NEW_TOKENS,
                      'frame': '640x480', 'rows': rows,
                      'flags': {s: c.flags for s, c in comps.items()}})
    plot(rows, plot_path('open_vlm'))
    return None


if __name__ == '__main__':
    main()

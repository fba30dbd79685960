"""x86 reference outputs for the arm64 runtime tests (test/arm64/), run by test_arm64.sh.

Runs on the host (x86_64) with the project venv, and writes into ``--out``:

* ``dsnet.npz``: the input images (rendered here, so the two OpenCV builds never draw
  them), the masks of the shipped FP32 and INT8 DSNet models, the FP32 top-1/top-2 logit
  margin per pixel (to tell a near-tie flip from a real difference) and, for the
  camera-sized scene that goes through cv2.resize, the preprocessed model input with its
  FP32 logits (to separate preprocessing differences from model differences).
* ``vlm.npz`` (when a VLM runtime and a bundle exist): the question's prompt ids, the image,
  its tiles, the image embeddings and the greedy tokens of each precision pair.
* ``reference.json``: what was computed, with versions, threads and timings, or why the VLM
  part was skipped.

Only numpy + onnxruntime + opencv (+ tokenizers) are imported: the same runtime code as on ARM.
"""
import argparse
import glob
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DSNET_DIR = os.path.join(REPO, 'bluelm_ros', 'models', 'dsnet')
DSNET_MODELS = {'fp32': 'dsnet_tiny_synthetic_480x640_fp32.onnx',
                'int8': 'dsnet_tiny_synthetic_480x640_int8.onnx'}
# (seed, height, width): two scenes at the model's input size (no resize: the input
# tensor is plain numpy arithmetic) and one camera-sized frame that takes the resize path.
# Few, because one FP32 inference takes about a minute under emulation.
SCENES = ((11, 480, 640), (22, 480, 640), (44, 720, 1280))
# A question of the shipped scene-QA model's caption template, so the answer means something.
VLM_QUESTION = 'describe the scene.'
VLM_SEED, VLM_SIZE = 55, (480, 640)
VLM_NEW_TOKENS = 32
# (vision, decoder) precision pairs: FP32 must match exactly, the quantized pair is reported.
VLM_PAIRS = (('fp32', 'fp32'), ('int8', 'int4'), ('int8', 'int8'))


def log(msg):
    print(f'[reference] {msg}', flush=True)


def dsnet_reference(threads):
    from bluelm_ros.runtime.image import to_rgb_uint8
    from bluelm_ros.runtime.segmenter import normalize, Segmenter
    from bluelm_ros.data.synthetic import render_scene

    out, info = {}, {'scenes': [list(s) for s in SCENES], 'models': {}, 'ms': {}}
    images = [render_scene(seed, h, w).image for seed, h, w in SCENES]
    for i, img in enumerate(images):
        out[f'image_{i}'] = np.ascontiguousarray(img)
    for prec, name in DSNET_MODELS.items():
        seg = Segmenter(os.path.join(DSNET_DIR, name), threads=threads)
        info['models'][prec] = name
        times = []
        for i, img in enumerate(images):
            t0 = time.perf_counter()
            out[f'mask_{prec}_{i}'] = seg.segment(img).mask
            times.append((time.perf_counter() - t0) * 1e3)
            if prec == 'fp32':
                logits = seg.logits(img)[0]
                top2 = np.sort(logits, axis=0)[-2:]
                margin = top2[1] - top2[0]
                h, w = img.shape[:2]
                if margin.shape != (h, w):
                    import cv2
                    margin = cv2.resize(margin, (w, h), interpolation=cv2.INTER_NEAREST)
                out[f'margin_fp32_{i}'] = margin.astype(np.float32)
                if img.shape[:2] != seg.input_size:
                    out[f'input_{i}'] = normalize(to_rgb_uint8(img), seg.input_size)
                    out[f'logits_fp32_{i}'] = logits
        info['ms'][prec] = [round(t, 1) for t in times]
        log(f'dsnet {prec}: {len(images)} scenes, {np.mean(times):.0f} ms/scene')
    agree = [float((out[f'mask_int8_{i}'] == out[f'mask_fp32_{i}']).mean())
             for i in range(len(images))]
    info['x86_int8_vs_fp32_agreement'] = agree
    return out, info


def find_vlm_bundle():
    """The bundle to compare: $BLUELM_ARM64_VLM_BUNDLE or the one shipped in the package."""
    env = os.environ.get('BLUELM_ARM64_VLM_BUNDLE')
    if env:
        return env
    found = sorted(glob.glob(os.path.join(REPO, 'bluelm_ros', 'models', 'vlm', '**',
                                          'manifest.json'), recursive=True))
    return os.path.dirname(found[0]) if found else None


def vlm_reference(threads):
    """Return (arrays, info); info['skip'] says why when there is nothing to compare."""
    try:
        from bluelm_ros.runtime.vlm.engine import VLMEngine
    except ImportError as exc:
        return {}, {'skip': f'no VLM runtime yet (bluelm_ros.runtime.vlm.engine: {exc})'}
    bundle = find_vlm_bundle()
    if bundle is None:
        return {}, {'skip': 'no shipped VLM bundle (bluelm_ros/models/vlm/*/manifest.json)'}
    from bluelm_ros.data.synthetic import render_scene
    from bluelm_ros.runtime.vlm.bundle import Bundle

    b = Bundle(bundle)
    pairs = [(v, d) for v, d in VLM_PAIRS
             if v in b.precisions('vision') and d in b.precisions('decoder')]
    image = np.ascontiguousarray(render_scene(VLM_SEED, *VLM_SIZE).image)
    rel = os.path.relpath(os.path.abspath(bundle), REPO)
    info = {'bundle': rel if not rel.startswith('..') else os.path.abspath(bundle),
            'question': VLM_QUESTION, 'max_new_tokens': VLM_NEW_TOKENS,
            'pairs': [], 'results': {}}
    out = {'image': image}
    for vis, dec in pairs:
        key = f'{vis}_{dec}'
        eng = VLMEngine(b, vision_precision=vis, decoder_precision=dec, threads=threads)
        t0 = time.perf_counter()
        emb = eng.encode_image(image)
        prompt = eng.build_prompt(VLM_QUESTION, emb)
        # Greedy, stopping at the config's EOS as the node does (the EOS token is included).
        res = eng.generate_ids(prompt, emb, max_new_tokens=VLM_NEW_TOKENS)
        ms = (time.perf_counter() - t0) * 1e3
        out[f'embeds_{key}'] = emb.embeds.astype(np.float32)
        out['tiles'] = eng.tiler(image).tiles
        out[f'tokens_{key}'] = np.asarray(res.tokens, np.int64)
        out['prompt_ids'] = np.asarray(prompt, np.int64)
        info['pairs'].append(key)
        info['results'][key] = {'text': res.text, 'ms': round(ms, 1),
                                'image_tokens': emb.num_tokens, 'tiles': emb.num_tiles}
        log(f'vlm {key}: {len(res.tokens)} tokens in {ms:.0f} ms: {res.text!r}')
        eng.close()
    if not pairs:
        info['skip'] = (f'bundle {bundle} has none of the precision pairs {VLM_PAIRS} '
                        f'(vision {b.precisions("vision")}, decoder {b.precisions("decoder")})')
    return out, info


def versions():
    import cv2
    import onnxruntime as ort
    return {'machine': platform.machine(), 'python': platform.python_version(),
            'numpy': np.__version__, 'onnxruntime': ort.__version__, 'opencv': cv2.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', required=True, help='folder for dsnet.npz, vlm.npz, reference.json')
    ap.add_argument('--threads', type=int, default=2, help='ONNX Runtime intra-op threads')
    ap.add_argument('--skip-vlm', action='store_true')
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    meta = {'host': versions(), 'threads': args.threads}

    arrays, meta['dsnet'] = dsnet_reference(args.threads)
    np.savez_compressed(os.path.join(args.out, 'dsnet.npz'), **arrays)

    if args.skip_vlm:
        arrays, meta['vlm'] = {}, {'skip': 'reference made with --skip-vlm'}
    else:
        arrays, meta['vlm'] = vlm_reference(args.threads)
    if arrays:
        np.savez_compressed(os.path.join(args.out, 'vlm.npz'), **arrays)
    if 'skip' in meta['vlm']:
        log(f'vlm: skipped: {meta["vlm"]["skip"]}')
    bad = [m for m in ('torch', 'transformers') if m in sys.modules]
    meta['x86_runtime_imported'] = bad
    with open(os.path.join(args.out, 'reference.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
    log(f'wrote {args.out}')


if __name__ == '__main__':
    main()

"""Score an exported bundle on held-out scene questions with the robot runtime (no torch).

    bluelm-ros vlm-eval BUNDLE [--per-type 200] [--seed-base 1000000000] [--json OUT]

This is what the robot runs: the bundle's INT8 vision graph and INT4 decoder (or the
precisions chosen) through :class:`VLMEngine`, greedy decoding, exact match per question
type on :func:`data.scene_qa.heldout_samples`. ``--seed-base`` moves the scenes to any
other unseen range (e.g. :data:`data.scene_qa.FRESH_SEED_BASE`).
"""
from __future__ import annotations

import json
import sys
import time

from bluelm_ros.data import scene_qa as sqa
from bluelm_ros.runtime.vlm.engine import VLMEngine


def evaluate_bundle(bundle_dir: str, n_per_type: int,
                    base: int = sqa.HELDOUT_SEED_BASE, vision: str = 'int8',
                    decoder: str = 'int4', threads: int = 0,
                    max_new_tokens: int = 24, progress: bool = True) -> dict:
    """Per-type exact match of one bundle; ``records`` holds every prediction."""
    engine = VLMEngine(bundle_dir, vision_precision=vision, decoder_precision=decoder,
                       threads=threads)
    types, preds, answers, records = [], [], [], []
    total = n_per_type * len(sqa.QTYPES)
    t0 = time.perf_counter()
    for i, s in enumerate(sqa.heldout_samples(n_per_type, base=base)):
        pred = engine.generate(s.question, image=s.image, max_new_tokens=max_new_tokens,
                               temperature=0.0).text.strip()
        types.append(s.qtype)
        preds.append(pred)
        answers.append(s.answer)
        records.append({'seed': s.seed, 'qtype': s.qtype, 'question': s.question,
                        'answer': s.answer, 'prediction': pred})
        if progress and (i + 1) % 60 == 0:
            print(f'vlm-eval: {i + 1}/{total}', file=sys.stderr, flush=True)
    engine.close()
    result = sqa.score(types, preds, answers)
    result.update(bundle=bundle_dir, vision=vision, decoder=decoder, seed_base=base,
                  seconds=round(time.perf_counter() - t0, 1), records=records)
    return result


def add_arguments(p) -> None:
    """``bluelm-ros vlm-eval`` options."""
    p.add_argument('bundle', help='bundle folder (manifest.json, ONNX graphs, tokenizer)')
    p.add_argument('--per-type', type=int, default=200, help='questions per type')
    p.add_argument('--seed-base', type=int, default=sqa.HELDOUT_SEED_BASE,
                   help='first scene seed (default: the held-out set)')
    p.add_argument('--vision', default='int8', help='vision precision in the bundle')
    p.add_argument('--decoder', default='int4', help='decoder precision in the bundle')
    p.add_argument('--threads', type=int, default=0, help='ONNX Runtime threads (0: all)')
    p.add_argument('--json', default=None, help='write the result (with predictions) here')


def run(args) -> int:
    """Evaluate and print the per-type table."""
    result = evaluate_bundle(args.bundle, args.per_type, args.seed_base, args.vision,
                             args.decoder, args.threads)
    print(sqa.format_scores(result))
    print(f'vlm-eval: {result["n"]} questions in {result["seconds"]} s '
          f'({args.vision} vision, {args.decoder} decoder, seeds from {args.seed_base})')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=1)
    return 0

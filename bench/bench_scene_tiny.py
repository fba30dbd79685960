"""The shipped scene-tiny bundle vs another export of it, interleaved (robot runtime).

Two contenders per measurement, taking turns (``harness.py``, 5 rounds): a 16-token greedy
answer about a frame already encoded and prefilled (what a question costs with eager
encoding), and encoding a 640x480 frame. Used for issue 16 to compare the fused
GroupQueryAttention + fused vision export with the previous ``kv_buffer`` + plain vision
export of the same weights::

    cp -r bluelm_ros/models/vlm/scene-tiny ~/.cache/bluelm_ros/bundles/scene-tiny-kv_buffer
    # (before re-exporting; or export it again with --attention kv_buffer --no-vision-fusion)
    python bench/bench_scene_tiny.py --reference ~/.cache/bluelm_ros/bundles/scene-tiny-kv_buffer

Results: ``bench/results/scene_tiny.json`` and ``scene_tiny.png``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, plot_path, save  # noqa: E402
from harness import interleaved, plot_comparisons  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'bluelm_ros', 'models', 'vlm', 'scene-tiny')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--reference', required=True, help='the other bundle (the reference)')
    ap.add_argument('--bundle', default=SHIPPED)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=5)
    args = ap.parse_args(argv)
    from bluelm_ros.data.synthetic import render_scene
    from bluelm_ros.runtime.vlm.bundle import Bundle
    from bluelm_ros.runtime.vlm.engine import VLMEngine
    frame = render_scene(7, 480, 640).image
    names = {}
    for label, path in (('reference', args.reference), ('bundle', args.bundle)):
        entry = Bundle(path, verify='size').entry('decoder', 'int4')
        fused = Bundle(path, verify='size').entry('vision', 'int8').get('fusion') is not None
        names[label] = (f'{label}: {entry.get("attention", "kv_buffer")} '
                        f'{entry["kv_dtype"]} KV, {"fused" if fused else "plain"} vision')
    engines = {names[k]: VLMEngine(p, threads=args.threads, verify='size')
               for k, p in (('reference', args.reference), ('bundle', args.bundle))}
    for eng in engines.values():
        eng.encode_image(frame, key='frame')
        eng.prepare(image_key='frame')

    def answer(eng):
        return lambda: eng.generate('how many cars are there?', image_key='frame',
                                    max_new_tokens=16, stop_token_ids=[])

    def encode(eng):
        def call():
            eng.images.clear()
            eng.encode_image(frame, key='new')
        return call

    results, comps = {'machine': machine(), 'threads': args.threads}, {}
    for label, make in (('answer 16 tokens, frame prepared', answer),
                        ('encode a 640x480 frame', encode)):
        comp = interleaved({n: make(e) for n, e in engines.items()}, rounds=args.rounds,
                           calls=5, warmup=1)
        print(label, '\n' + comp.table(), flush=True)
        comps[label] = comp
        results[label] = comp.to_dict()
    save('scene_tiny', results)
    plot_comparisons(comps, plot_path('scene_tiny'), 'scene-tiny bundle, robot runtime')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Scene-QA data generator, its tokenizer and a CPU training smoke test of the VLM."""

import argparse
import dataclasses
import json
import re

import numpy as np
import pytest

from bluelm_ros.data import synthetic as syn
from bluelm_ros.data import scene_qa as sqa
from bluelm_ros.tools.vlm.configs import load_config
from bluelm_ros.runtime.vlm.dynamic_resolution import DynamicResolution

GEN = sqa.SceneQAGenerator()


# ---------------------------------------------------------------------------
# helpers: answers recomputed from the scene, independently of the generator


def _objects(scene, kind):
    return [o for o in scene.objects if o.kind == kind]


def _parse_object(phrase):
    """'car' / 'red car' / 'person in red' -> (kind, colour or None)."""
    m = re.fullmatch(r'person in (\w+)', phrase)
    if m:
        return 'person', m.group(1)
    words = phrase.split()
    return (words[0], None) if len(words) == 1 else (words[1], words[0])


def _resolve_unique(scene, phrase):
    kind, color = _parse_object(phrase)
    objs = [o for o in _objects(scene, kind) if color is None or o.color == color]
    assert len(objs) == 1, (phrase, scene.objects)
    return objs[0]


def _resolve_order(scene, phrase):
    """'car on the left', 'leftmost car', 'nearest person', 'bus' -> the object."""
    w = scene.mask.shape[1]
    m = re.fullmatch(r'(\w+) on the (left|right)', phrase)
    if m:
        objs = _objects(scene, m.group(1))
        assert len(objs) == 2
        ref = 'leftmost' if m.group(2) == 'left' else 'rightmost'
    else:
        m = re.fullmatch(r'(leftmost|rightmost|nearest|farthest) (\w+)', phrase)
        if not m:
            objs = _objects(scene, phrase)
            assert len(objs) == 1
            return objs[0]
        objs = _objects(scene, m.group(2))
        ref = m.group(1)
        assert len(objs) >= (3 if ref in ('leftmost', 'rightmost') else 2)
    if ref in ('leftmost', 'rightmost'):
        key, gap = (lambda o: o.center_x), sqa.ORDER_GAP_X * w
    else:
        key, gap = (lambda o: o.distance), sqa.ORDER_GAP_DEPTH
    ranked = sorted(objs, key=key)
    if ref in ('rightmost', 'farthest'):
        ranked = ranked[::-1]
    assert abs(key(ranked[0]) - key(ranked[1])) >= gap - 1e-9
    return ranked[0]


def _shares(scene):
    hist = np.bincount(scene.mask.ravel(), minlength=256) / scene.mask.size
    return {name: hist[cid] for cid, name in sqa.REGION_NAMES.items()}


def expected_answer(sample):
    """Recompute the answer of a sample from its scene's objects and mask."""
    scene, q = sample.scene, sample.question
    w = scene.mask.shape[1]
    if sample.qtype in sqa.OBJECT_QTYPES:
        assert sqa.object_issues(scene) == []
    m = re.fullmatch(r'(?:is there a|do you see a) (.+?)(?: in the image)?\?', q)
    if m:
        kind, color = _parse_object(m.group(1))
        return 'yes' if any(o.kind == kind and (color is None or o.color == color)
                            for o in scene.objects) else 'no'
    m = re.fullmatch(r'are there any (\w+)\?', q)
    if m:
        kind = {'cars': 'car', 'buses': 'bus', 'people': 'person'}[m.group(1)]
        return 'yes' if _objects(scene, kind) else 'no'
    m = re.fullmatch(r'how many (\w+) (?:are there|can you see)\?|count the (\w+)\.', q)
    if m:
        plural = m.group(1) or m.group(2)
        if plural == 'vehicles':
            return str(len(_objects(scene, 'car')) + len(_objects(scene, 'bus')))
        kind = {'cars': 'car', 'buses': 'bus', 'people': 'person'}[plural]
        return str(len(_objects(scene, kind)))
    m = re.fullmatch(r'what color shirt is the (.+) wearing\?|what color is the (.+)\?', q)
    if m:
        phrase = m.group(1) or m.group(2)
        obj = _resolve_order(scene, phrase)
        assert (obj.kind == 'person') == bool(m.group(1))
        return obj.color
    m = re.fullmatch(r'is the (.+) on the left or the right\?', q)
    if m:
        obj = _resolve_unique(scene, m.group(1))
        assert abs(obj.center_x - w / 2) >= sqa.SIDE_MARGIN * w
        return 'left' if obj.center_x < w / 2 else 'right'
    m = re.fullmatch(r'is the (.+) near or far\?', q)
    if m:
        obj = _resolve_unique(scene, m.group(1))
        assert obj.distance <= 0.3 or obj.distance >= 0.5
        return 'near' if obj.distance <= 0.3 else 'far'
    m = re.fullmatch(r'which is closer, the (.+) or the (.+)\?', q)
    if m:
        a, b = (_resolve_unique(scene, g) for g in m.groups())
        assert abs(a.distance - b.distance) >= sqa.CLOSER_GAP
        return 'the ' + (m.group(1) if a.distance < b.distance else m.group(2))
    if q in sqa.LARGEST_TEMPLATES:
        ranked = sorted(_shares(scene).items(), key=lambda kv: -kv[1])
        assert ranked[0][1] - ranked[1][1] >= sqa.REGION_MARGIN
        return ranked[0][0]
    m = re.fullmatch(r'is there more (\w+) or (\w+)\?', q)
    if m:
        s = _shares(scene)
        a, b = m.groups()
        assert abs(s[a] - s[b]) >= sqa.REGION_MARGIN
        return a if s[a] > s[b] else b
    if q in sqa.CAPTION_TEMPLATES:
        n = {k: len(_objects(scene, k)) for k in sqa.KINDS}
        if not any(n.values()):
            return 'an empty street.'
        names = {'car': ('car', 'cars'), 'bus': ('bus', 'buses'),
                 'person': ('person', 'people')}
        parts = [f'{n[k]} {names[k][n[k] != 1]}' for k in ('car', 'bus', 'person') if n[k]]
        body = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
        return f'a street with {body}.'
    raise AssertionError(f'unparsed question {q!r}')


# ---------------------------------------------------------------------------
# generator


def test_samples_are_deterministic():
    for seed, qtype in [(3, 'color'), (4, 'caption'), (5, None)]:
        a, b = GEN.sample(seed, qtype), GEN.sample(seed, qtype)
        assert a.question == b.question and a.answer == b.answer and a.qtype == b.qtype
        assert a.image.dtype == np.uint8 and np.array_equal(a.image, b.image)
    s1, q1 = GEN.scene_questions(11)
    s2, q2 = GEN.scene_questions(11)
    assert q1 == q2 and np.array_equal(s1.image, s2.image)
    assert not np.array_equal(GEN.sample(1, 'count').image, GEN.sample(2, 'count').image)


def test_heldout_seeds_are_disjoint_and_balanced():
    seeds = sqa.heldout_seeds(5)
    assert len(seeds) == 30 and min(s for s, _ in seeds) >= sqa.HELDOUT_SEED_BASE
    assert {t: sum(q == t for _, q in seeds) for t in sqa.QTYPES} == dict.fromkeys(
        sqa.QTYPES, 5)


def test_image_sizes_vary_and_exercise_the_tiler():
    cfg = load_config('scene-tiny')
    dr = DynamicResolution.from_config(cfg)
    grids, aspects = set(), []
    small = sqa.SceneQAGenerator(scale_range=(0.3, 1.0))
    for seed in range(200):
        (nw, nh), (rw, rh) = GEN.image_size(seed)
        assert 320 <= nw <= 800 and 240 <= nh <= 600 and (rw, rh) == (nw, nh)
        aspects.append(nw / nh)
        grids.add(dr.select(nw, nh))
        (sw, sh), (tw, th) = small.image_size(seed)
        assert (sw, sh) == (nw, nh) and min(tw, th) >= min(144, nw, nh) - 1
        assert dr.select(tw, th) == dr.select(nw, nh) or min(tw, th) < 160
    assert min(aspects) < 0.7 and max(aspects) > 1.9  # portrait and wide
    assert {(2, 2), (3, 2), (2, 3), (4, 2), (2, 4)} <= grids
    assert cfg.vision.grid % 2 == 1 and cfg.tokens_per_tile == 25  # odd grid gets padded


@pytest.mark.parametrize('qtype', sqa.QTYPES)
def test_answers_follow_from_the_scene(qtype):
    answers = set()
    for seed in range(40):
        s = GEN.sample(1000 + seed, qtype)
        assert s.qtype == qtype
        assert s.answer == expected_answer(s), (seed, s.question)
        answers.add(s.answer)
    assert len(answers) >= 2  # not a constant answer


def test_training_scene_questions_are_correct():
    gen = sqa.SceneQAGenerator(scale_range=(0.3, 1.0))
    seen = set()
    for seed in range(30):
        scene, qas = gen.scene_questions(seed, sqa.QTYPES + ('color', 'count'))
        assert qas and len({q for _, q, _ in qas}) == len(qas)
        for qtype, q, a in qas:
            s = sqa.QASample(scene.image, q, a, qtype, seed, scene)
            assert a == expected_answer(s), (seed, q)
            seen.add(qtype)
    assert seen == set(sqa.QTYPES)


def _fake_scene(objects, h=200, w=400):
    mask = np.full((h, w), syn.ROAD, np.uint8)
    for o in objects:
        x0, y0, x1, y1 = o.box
        mask[y0:y1, x0:x1] = sqa.KIND_CLASS[o.kind]
    return syn.Scene(np.zeros((h, w, 3), np.uint8), mask, list(objects), 0)


def test_ambiguous_references_are_not_asked():
    car = syn.SceneObject
    # two cars whose centres are 4 % of the width apart: no "car on the left/right",
    # but their depths differ enough for nearest/farthest
    scene = _fake_scene([car('car', 'red', (100, 100, 186, 150), 0.2),
                         car('car', 'blue', (116, 120, 202, 170), 0.5)])
    refs = {ref for _, ref, _ in sqa._order_refs(scene)}
    assert refs == {'nearest', 'farthest'}
    # a car in the middle band has no side
    mid = car('car', 'red', (180, 100, 220, 123), 0.6)
    assert sqa.side_of(mid, 400) is None
    assert sqa.near_far(car('car', 'red', (0, 0, 10, 6), 0.4)) is None
    # a listed car without visible pixels (hidden behind a nearer car) is an issue
    hidden = _fake_scene([car('car', 'red', (100, 100, 186, 150), 0.2)])
    hidden.objects.append(car('car', 'green', (110, 105, 180, 146), 0.6))
    assert any('occluded' in i for i in sqa.object_issues(hidden))
    # a car cut in half by the border is an issue, a whole one is not
    assert sqa.object_issues(_fake_scene([car('car', 'red', (0, 100, 40, 150), 0.2)]))
    assert sqa.object_issues(_fake_scene([car('car', 'red', (100, 100, 186, 150), 0.2)])) == []
    # class pixels outside every listed box (an object the renderer dropped) is an issue
    stray = _fake_scene([])
    stray.mask[10:30, 10:30] = syn.PERSON
    assert sqa.object_issues(stray)


def test_caption_normalize_and_score():
    assert sqa.caption_for({'car': 2, 'person': 1}) == 'a street with 2 cars and 1 person.'
    assert sqa.caption_for({'car': 1, 'bus': 1, 'person': 3}) == \
        'a street with 1 car, 1 bus and 3 people.'
    assert sqa.caption_for({}) == 'an empty street.'
    assert sqa.is_correct(' Two. ', '2') and sqa.is_correct('The  Car', 'the car')
    assert not sqa.is_correct('left', 'right')
    r = sqa.score(['count', 'count', 'color'], ['2', 'three', 'red'], ['2', '2', 'red'])
    assert r['per_type']['count']['accuracy'] == 0.5 and r['per_type']['color']['correct'] == 1
    assert r['overall'] == pytest.approx(2 / 3) and r['n'] == 3
    assert 'overall' in sqa.format_scores(r)
    assert sqa.evaluate(lambda img, q: 'no', n_per_type=1)['n'] == len(sqa.QTYPES)


# ---------------------------------------------------------------------------
# tokenizer, batching, training (torch)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    pytest.importorskip('torch')
    pytest.importorskip('tokenizers')
    from bluelm_ros.tools.vlm.train import train_tokenizer
    path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
    return train_tokenizer(str(path), load_config('scene-tiny'))


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from bluelm_ros.tools.vlm.train import train_tokenizer
    cfg = tokenizer.config
    assert tokenizer.tokenizer.get_vocab_size() <= cfg.text.vocab_size
    for name, want in (('<pad>', cfg.pad_token_id), ('<s>', cfg.bos_token_id),
                       ('</s>', cfg.eos_token_ids[0]), ('<image>', cfg.image_token_id)):
        assert tokenizer.tokenizer.token_to_id(name) == want
    longest = 0
    for text in sqa.corpus():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        longest = max(longest, len(ids))
    assert longest <= 16  # whole words are single tokens
    assert tokenizer.encode('yes') and len(tokenizer.encode('what color is the car?')) == 6
    odd = 'Ünïcode 🙂 and unseen words'
    assert tokenizer.decode(tokenizer.encode(odd)) == odd
    ids = tokenizer.build_prompt('is there a car?', 25)
    assert ids[0] == cfg.bos_token_id and ids.count(cfg.image_token_id) == 25
    assert tokenizer.tokenizer.id_to_token(ids[1]) == '[|Human|]:'
    assert tokenizer.tokenizer.id_to_token(ids[-1]) == '[|AI|]:'
    # deterministic training
    again = train_tokenizer(str(tmp_path / 'tokenizer.json'), cfg)
    assert again.tokenizer.to_str() == tokenizer.tokenizer.to_str()


def _mini_config(tmp_path):
    cfg = load_config('scene-tiny')
    cfg = dataclasses.replace(
        cfg, name='scene-mini',
        vision=dataclasses.replace(cfg.vision, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2),
        text=dataclasses.replace(cfg.text, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16),
        downsampler_dim=64)
    path = tmp_path / 'scene-mini.json'
    cfg.to_json(str(path))
    return str(path)


def test_flipped_scenes_and_colour_maps():
    gen = sqa.SceneQAGenerator(scale_range=(0.3, 1.0))
    for seed in range(12):
        scene, clear = gen.clear_scene(seed)
        mirror = sqa.flip_scene(scene)
        w = scene.mask.shape[1]
        assert np.array_equal(mirror.image[:, ::-1], scene.image)
        for o, f in zip(scene.objects, mirror.objects):
            assert f.center_x == pytest.approx(w - o.center_x) and f.area == o.area
        assert (sqa.object_issues(mirror) == []) == clear
        for qtype, q, a in gen.ask_many(mirror, seed, sqa.QTYPES, 1, clear):
            assert a == expected_answer(sqa.QASample(mirror.image, q, a, qtype, seed, mirror))
        cmap = sqa.color_map(scene)
        objects = np.isin(scene.mask, list(sqa.KIND_CLASS.values()))
        assert ((cmap < len(sqa.COLORS)) <= objects).all()
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert (cmap[y0:y1, x0:x1] == sqa.COLORS.index(o.color)).any()


def test_patch_targets_follow_the_tiler():
    from bluelm_ros.tools.vlm.train import patch_targets
    cfg = load_config('scene-tiny')
    dr = DynamicResolution.from_config(cfg)
    h, w = 300, 500
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2:] = 1  # right half class 1
    tiled = dr(np.zeros((h, w, 3), np.uint8))
    t = patch_targets(label, tiled, 72, 8, 3)
    g = cfg.vision.grid
    assert t.shape == (tiled.num_tiles, g * g, 3)
    total = t.sum(-1)
    assert total.max() <= 1 + 1e-6 and t[..., 2].max() == 0  # class 2 absent
    # padding (top/bottom of the canvas for a wide image) carries no target
    assert (total == 0).any() and (total == 1).any()
    m, n = tiled.grid
    grid_tiles = t[:m * n].reshape(n, m, g, g, 3)
    canvas = grid_tiles.transpose(0, 2, 1, 3, 4).reshape(n * g, m * g, 3)
    full = canvas.sum(-1) > 0.99
    cols = np.where(full.any(0))[0]
    left, right = canvas[:, cols[0], :], canvas[:, cols[-1], :]
    assert (left[full[:, cols[0]], 0] == 1).all() and (right[full[:, cols[-1]], 1] == 1).all()
    thumb = t[-1].reshape(g, g, 3)
    assert thumb[g // 2, 0, 0] == 1 and thumb[g // 2, -1, 1] == 1


def test_collate_packs_questions_behind_one_image(tokenizer):
    import torch
    from bluelm_ros.tools.vlm.train import IGNORE, N_COLOR, N_SEM, SceneQATrainSet, collate_train
    cfg = tokenizer.config
    data = SceneQATrainSet(tokenizer, cfg, start=5, length=2, scale_range=(0.3, 0.3))
    items = [data[0], data[1]]
    recs = [r for it in items for r in it]
    assert len(recs) == 4  # each scene and its mirror image
    batch = collate_train(items)
    assert batch['input_ids'].shape[0] == len(recs)
    assert batch['tiles'].shape[1:] == (3, 72, 72)
    assert batch['tiles'].shape[0] * cfg.tokens_per_tile == sum(r['n_tok'] for r in recs)
    assert batch['aux'].shape == (batch['tiles'].shape[0], cfg.vision.grid ** 2,
                                  N_SEM + N_COLOR)
    slots = int((batch['input_ids'] == cfg.image_token_id).sum())
    assert slots == batch['img_index'].numel() == sum(r['n_tok'] for r in recs)
    assert batch['qtype'].numel() == sum(len(r['blocks']) for r in recs)
    for i, r in enumerate(recs):
        p = len(r['prefix'])
        assert batch['block'][i, :p].eq(0).all() and batch['labels'][i, :p].eq(IGNORE).all()
        assert batch['position_ids'][i, :p].tolist() == list(range(p))
        off = p
        for j, (_, suffix, answer) in enumerate(r['blocks'], 1):
            n = len(suffix) + len(answer)
            assert batch['block'][i, off:off + n].eq(j).all()
            assert batch['position_ids'][i, off:off + n].tolist() == list(range(p, p + n))
            assert batch['labels'][i, off:off + len(suffix)].eq(IGNORE).all()
            assert batch['labels'][i, off + len(suffix):off + n].tolist() == answer
            assert answer[-1] == cfg.eos_token_ids[0]
            off += n
        assert batch['block'][i, off:].eq(-1).all() and batch['labels'][i, off:].eq(IGNORE).all()
    assert torch.equal(collate_train(items)['input_ids'], batch['input_ids'])


def test_packed_blocks_equal_separate_prompts(tokenizer, tmp_path):
    import torch
    from bluelm_ros.runtime.vlm.config import BlueLMVConfig
    from bluelm_ros.tools.vlm.modeling import BlueLMV
    from bluelm_ros.tools.vlm.train import (SceneQATrainSet, collate_train, image_embeddings,
                                            packed_mask)
    torch.manual_seed(0)
    cfg = BlueLMVConfig.from_json(_mini_config(tmp_path))
    model = BlueLMV(cfg).eval()
    rec = SceneQATrainSet(tokenizer, cfg, start=9, length=1, scale_range=(0.3, 0.3),
                          flip=False)[0][0]
    assert len(rec['blocks']) >= 4
    batch = collate_train([[rec]])
    with torch.no_grad():
        img, _ = image_embeddings(model, batch['tiles'].float(), batch['img_index'])
        packed, _ = model.language_model(model.merge(batch['input_ids'], img),
                                         batch['position_ids'], packed_mask(batch['block']))
        p, off = len(rec['prefix']), len(rec['prefix'])
        for _, suffix, answer in rec['blocks']:
            n = len(suffix) + len(answer)
            single, _ = model(torch.tensor([rec['prefix'] + suffix + answer]),
                              pixel_values=rec['tiles'].float())
            torch.testing.assert_close(packed[0, off:off + n], single[0, p:p + n],
                                       rtol=1e-4, atol=1e-5)
            off += n


def test_batched_greedy_matches_generate_greedy(tokenizer, tmp_path):
    import torch
    from bluelm_ros.runtime.vlm.config import BlueLMVConfig
    from bluelm_ros.tools.vlm.modeling import BlueLMV
    from bluelm_ros.tools.vlm.train import HeldoutSet, generate_batch
    torch.manual_seed(0)
    cfg = BlueLMVConfig.from_json(_mini_config(tmp_path))
    model = BlueLMV(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy picks are not near-ties
        model.language_model.embed_tokens.weight.mul_(20)
    data = HeldoutSet(tokenizer, cfg, 1)
    items = [data[i] for i in range(len(data))]
    assert len({tuple(it['grid']) for it in items}) >= 2  # different prompt lengths
    got = generate_batch(model, [it['prompt'] for it in items],
                         [it['tiles'] for it in items], max_new_tokens=5)
    for it, g in zip(items, got):
        ref = model.generate_greedy(torch.tensor([it['prompt']]), pixel_values=it['tiles'],
                                    max_new_tokens=5)
        assert g == ref


def test_cpu_training_smoke(tmp_path):
    pytest.importorskip('torch')
    pytest.importorskip('tokenizers')
    from bluelm_ros.tools.vlm import train
    out = tmp_path / 'run'
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    base = ['--out', str(out), '--config', _mini_config(tmp_path), '--device', 'cpu',
            '--batch-scenes', '2', '--questions', 'types', '--train-scale', '0.3', '0.3',
            '--workers', '0', '--lr', '3e-3', '--warmup', '4', '--log-every', '1',
            '--eval-per-type', '1', '--eval-batch', '6']
    assert train.run(p.parse_args(base + ['--steps', '20'])) == 0
    log = [json.loads(line) for line in (out / 'train_log.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in log]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:3]), losses
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'checkpoint.pt'):
        assert (out / name).exists()
    result = json.loads((out / 'eval.json').read_text())
    assert set(result['per_type']) == set(sqa.QTYPES) and result['n'] == 6
    assert result['training']['steps'] == 20
    # resume continues the step count and the data order
    assert train.run(p.parse_args(base + ['--steps', '22', '--resume',
                                          '--eval-per-type', '0'])) == 0
    log = [json.loads(line) for line in (out / 'train_log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log[-2:]] == [21, 22]
    # the saved model answers through the PyTorch answerer
    answer = train.TorchAnswerer(str(out))(GEN.sample(7, 'presence').image, 'is there a car?')
    assert isinstance(answer, str)
    # a second stage starts from those weights: same tokenizer, loss where stage 1 ended
    stage2 = tmp_path / 'stage2'
    stage2_args = ['--out', str(stage2)] + base[2:] + ['--init-from', str(out), '--seed', '1',
                                                       '--steps', '2', '--eval-per-type', '0']
    assert train.run(p.parse_args(stage2_args)) == 0
    assert (stage2 / 'tokenizer.json').read_bytes() == (out / 'tokenizer.json').read_bytes()
    first = json.loads((stage2 / 'train_log.jsonl').read_text().splitlines()[0])
    assert first['step'] == 1 and first['loss'] < 0.8 * np.mean(losses[:3])
    with pytest.raises(SystemExit, match='init-from needs'):
        train.run(p.parse_args(['--out', str(tmp_path / 'x')] + base[2:]
                               + ['--init-from', str(tmp_path / 'nowhere'), '--steps', '1']))

"""Open VLM checkpoints end to end: raw image + question -> same tokens as transformers.

For each family (SmolVLM, Idefics3, LLaVA + SigLIP, LLaVA + CLIP; see hf_vlm_fixtures) a
tiny random-weight checkpoint is saved with its own processor, then:

* **transformers** (the oracle), as its model cards show: ``processor.apply_chat_template``
  + ``processor(text, images)`` + ``model.generate`` (greedy);
* **ours**: ``convert`` -> ``export_bundle`` (FP32 + INT8 vision, FP32 + INT4 decoder) ->
  ``VLMEngine.generate(question, image=rgb)``, i.e. numpy preprocessing, chat template,
  tokenizer and stop tokens all read from the bundle.

Checked: ``input_ids`` identical, ``pixel_values`` within 1e-5, greedy tokens identical and
teacher-forced logits within 1e-4 through the FP32 bundle, the image reaching the logits,
the stop token from ``generation_config.json``, the answer through the ROS node's service;
INT8 vision / INT4 decoder agreement is measured and printed (``pytest -s``).
"""

from dataclasses import dataclass
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('onnx')
pytest.importorskip('skimage')
pytest.importorskip('jinja2')
from PIL import Image  # noqa: E402

from bluelm_ros.runtime.vlm.engine import VLMEngine  # noqa: E402
from bluelm_ros.tools.vlm.convert import convert as convert_family  # noqa: E402
from bluelm_ros.tools.vlm.export import ExportOptions, export_bundle  # noqa: E402
from bluelm_ros.tools.vlm.modeling import BlueLMV  # noqa: E402
import hf_vlm_fixtures as fixtures  # noqa: E402

NEW_TOKENS = 16
QUESTION = 'what is in the image? describe it please.'
SYSTEM = 'you are a helpful robot.'
# seeds whose greedy answers vary within 16 tokens (random tiny models often repeat one)
SEEDS = {'smolvlm': 0, 'idefics3': 5, 'llava_siglip': 3, 'llava_clip': 0}
PHOTOS = ('frame640x480', 'chelsea')


@dataclass
class Reference:
    """What transformers does with one photo and the question."""

    input_ids: list
    pixel_values: np.ndarray
    tokens: list
    logits: np.ndarray  # [new tokens, vocab] per generated step


@dataclass
class Case:
    """A converted and exported checkpoint next to its transformers original."""

    family: str
    hf_dir: str
    model_dir: str
    bundle: str
    model: object
    processor: object
    refs: dict


def hf_messages(with_image=True, system=None):
    content = ([{'type': 'image'}] if with_image else []) + [{'type': 'text',
                                                              'text': QUESTION}]
    msgs = [{'role': 'user', 'content': content}]
    if system:
        msgs.insert(0, {'role': 'system', 'content': [{'type': 'text', 'text': system}]})
    return msgs


def hf_reference(model, processor, rgb) -> Reference:
    prompt = processor.apply_chat_template(hf_messages(), add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.fromarray(rgb)], return_tensors='pt')
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    n = inputs['input_ids'].shape[1]
    return Reference(inputs['input_ids'][0].tolist(), inputs['pixel_values'].numpy(),
                     out.sequences[0, n:].tolist(), torch.cat(out.logits).numpy())


def convert(hf_dir, out_dir):
    with open(os.path.join(hf_dir, 'config.json')) as f:
        llava = json.load(f)['model_type'] == 'llava'
    return convert_family('llava' if llava else 'idefics3', hf_dir, out_dir)


def build_case(family, base) -> Case:
    ck = fixtures.build(family, str(base / 'hf'), seed=SEEDS[family])
    model_dir, bundle = str(base / 'converted'), str(base / 'bundle')
    convert(ck.path, model_dir)
    export_bundle(BlueLMV.from_pretrained(model_dir), bundle,
                  ExportOptions(vision=('fp32', 'int8'), decoder=('fp32', 'int4')),
                  tokenizer_dir=model_dir)
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(ck.path)
    model = ck.model_class.from_pretrained(ck.path).eval()
    photos = fixtures.photos()
    refs = {name: hf_reference(model, processor, photos[name]) for name in PHOTOS}
    return Case(family, ck.path, model_dir, bundle, model, processor, refs)


@pytest.fixture(scope='module', params=fixtures.FAMILIES)
def case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def engines():
    """One FP32 engine per bundle (sessions load once per module)."""
    made = {}

    def get(case, vision='fp32', decoder='fp32'):
        key = (case.bundle, vision, decoder)
        if key not in made:
            made[key] = VLMEngine(case.bundle, vision, decoder, threads=2)
        return made[key]
    yield get
    for eng in made.values():
        eng.close()


def test_input_ids_and_pixel_values_identical(case, engines):
    eng = engines(case)
    photos = fixtures.photos()
    for name, ref in case.refs.items():
        tiled = eng.tiler(photos[name])
        pv = ref.pixel_values.reshape(tiled.tiles.shape)
        diff = float(np.abs(pv - tiled.tiles).max())
        emb = eng.encode_image(photos[name])
        ids = eng.build_prompt(QUESTION, emb)
        print(f'{case.family:12s} {name:13s}: {len(ids)} prompt tokens ({emb.num_tokens} image, '
              f'{emb.num_tiles} tiles), input_ids equal {ids == ref.input_ids}, '
              f'max |pixel_values diff| {diff:.1e}')
        assert diff <= 1e-5
        assert ids == ref.input_ids
    # system prompt and a text-only question render and tokenize as transformers does
    proc = case.processor
    prompt = proc.apply_chat_template(hf_messages(system=SYSTEM), add_generation_prompt=True)
    img = photos['chelsea']
    want = proc(text=prompt, images=[Image.fromarray(img)])['input_ids'][0]
    assert eng.build_prompt(QUESTION, eng.encode_image(img), system=SYSTEM) == list(want)
    prompt = proc.apply_chat_template(hf_messages(with_image=False), add_generation_prompt=True)
    assert eng.build_prompt(QUESTION) == list(proc(text=prompt)['input_ids'][0])


def test_greedy_tokens_identical_from_raw_image(case, engines):
    eng = engines(case)
    photos = fixtures.photos()
    for name, ref in case.refs.items():
        res = eng.generate(QUESTION, image=photos[name], max_new_tokens=NEW_TOKENS)
        emb = eng.encode_image(photos[name])
        prompt = eng.build_prompt(QUESTION, emb)
        ours = eng.teacher_forced_logits(prompt, ref.tokens[:-1], emb)
        diff = float(np.abs(ours - ref.logits).max())
        print(f'{case.family:12s} {name:13s}: tokens identical {res.tokens == ref.tokens} '
              f'({len(ref.tokens)}: {ref.tokens}), teacher-forced max |logit diff| {diff:.1e}')
        assert res.tokens == ref.tokens
        assert diff < 1e-4
    # the image reaches the answer: the other photo gets other tokens
    a, b = (case.refs[n] for n in PHOTOS)
    assert a.tokens != b.tokens
    assert np.abs(a.logits[0] - b.logits[0]).max() > 1e-2


def test_int8_vision_and_int4_decoder_agreement(case, engines):
    """Teacher-forced top-1 agreement with transformers' greedy tokens (reported).

    Tiny random models are a floor: 64-wide rows make INT4's 32-blocks half a row (see
    docs/vlm-runtime.md); the assertion only guards against a broken graph.
    """
    photos = fixtures.photos()
    rows = []
    for vision, decoder in (('int8', 'fp32'), ('fp32', 'int4'), ('int8', 'int4')):
        eng = engines(case, vision, decoder)
        hits, total, cos = 0, 0, []
        for name, ref in case.refs.items():
            emb = eng.encode_image(photos[name])
            logits = eng.teacher_forced_logits(eng.build_prompt(QUESTION, emb),
                                               ref.tokens[:-1], emb)
            hits += int((logits.argmax(-1) == np.asarray(ref.tokens)).sum())
            total += len(ref.tokens)
            cos += [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
                    for x, y in zip(logits, ref.logits)]
        rows.append((vision, decoder, hits / total, float(np.mean(cos))))
        eng.close()
    for vision, decoder, agree, cos in rows:
        print(f'{case.family:12s} vision {vision} decoder {decoder}: token agreement '
              f'{agree:.2f}, mean logit cosine {cos:.4f}')
    assert rows[0][2] >= 0.8 and rows[0][3] > 0.99   # INT8 vision alone is close
    assert all(cos > 0.8 for *_, cos in rows)


def test_stop_token_from_generation_config(tmp_path, case):
    """Generation stops where transformers stops: on generation_config.json's eos ids."""
    if case.family != 'smolvlm':
        pytest.skip('one family is enough: the path is shared')
    ref = case.refs[PHOTOS[0]]
    stop = ref.tokens[5]
    hf_dir = str(tmp_path / 'hf')
    shutil.copytree(case.hf_dir, hf_dir)
    path = os.path.join(hf_dir, 'generation_config.json')
    with open(path) as f:
        gen = json.load(f)
    gen['eos_token_id'] = [stop]
    with open(path, 'w') as f:
        json.dump(gen, f)
    from transformers import AutoProcessor
    model = type(case.model).from_pretrained(hf_dir).eval()
    hf = hf_reference(model, AutoProcessor.from_pretrained(hf_dir),
                      fixtures.photos()[PHOTOS[0]])
    assert hf.tokens == ref.tokens[:ref.tokens.index(stop) + 1]
    cfg = convert(hf_dir, str(tmp_path / 'converted'))
    assert cfg.eos_token_ids == [stop]
    export_bundle(BlueLMV.from_pretrained(str(tmp_path / 'converted')), str(tmp_path / 'b'),
                  ExportOptions(vision=('fp32',), decoder=('fp32',)),
                  tokenizer_dir=str(tmp_path / 'converted'))
    eng = VLMEngine(str(tmp_path / 'b'), 'fp32', 'fp32', threads=2)
    res = eng.generate(QUESTION, image=fixtures.photos()[PHOTOS[0]],
                       max_new_tokens=NEW_TOKENS)
    eng.close()
    assert res.tokens == hf.tokens and res.stop_reason == 'eos'


def test_smolvlm_keeps_its_own_lm_head(case):
    """Tie flag only in text_config, own lm_head.weight in the file: kept, as transformers."""
    if case.family != 'smolvlm':
        pytest.skip('the SmolVLM fixture is the one with that layout')
    with open(os.path.join(case.hf_dir, 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['text_config']['tie_word_embeddings'] and not cfg.get('tie_word_embeddings')
    ours = BlueLMV.from_pretrained(case.model_dir)
    assert not ours.config.text.tie_word_embeddings
    head = case.model.lm_head.weight.detach()
    assert torch.equal(ours.language_model.lm_head.weight, head)
    assert not torch.equal(head, case.model.get_input_embeddings().weight)


def test_node_service_answers_like_transformers(case, spin):
    """The ROS node needs only bundle_path: processor, template and stops come from it."""
    if case.family not in ('smolvlm', 'llava_clip'):
        pytest.skip('two families through the node are enough: the engine path is shared')
    pytest.importorskip('rclpy')
    import rclpy
    from rclpy.parameter import Parameter
    from bluelm_ros.ros import common, image_codec, interfaces
    from bluelm_ros.ros.scene_qa_node import SceneQANode
    from ros_helpers import wait_until
    try:
        srv = interfaces.load('srv')
    except interfaces.InterfacesUnavailable as e:
        pytest.skip(str(e))
    params = [Parameter('bundle_path', value=case.bundle), Parameter('threads', value=1),
              Parameter('vision_precision', value='fp32'),
              Parameter('decoder_precision', value='fp32'),
              Parameter('generation.max_new_tokens', value=NEW_TOKENS)]
    node = SceneQANode('scene_qa', namespace=f'/open_{case.family}',
                       parameter_overrides=params)
    probe = rclpy.create_node('probe', namespace=f'/open_{case.family}')
    # every probe entity before its executor spins (see test_scene_qa_node's rig)
    client = probe.create_client(srv.AskScene, f'/open_{case.family}/scene_qa/ask')
    spinners = [spin(node, num_threads=node.executor_threads), spin(probe)]
    try:
        assert common.lifecycle_state(node) == 'active', node.configure_error
        assert client.wait_for_service(timeout_sec=30)
        ref = case.refs[PHOTOS[1]]
        req = srv.AskScene.Request(question=QUESTION)
        req.image = image_codec.numpy_to_image(fixtures.photos()[PHOTOS[1]], 'rgb8')
        future = client.call_async(req)
        assert wait_until(future.done, timeout=120)
        res = future.result()
        assert res.success, res.error_message
        want = case.processor.tokenizer.decode(ref.tokens, skip_special_tokens=True)
        print(f'{case.family}: node answer {res.answer!r}, transformers {want!r}')
        assert res.answer == want
        assert res.timings.generated_tokens == len(ref.tokens)
        assert res.timings.prompt_tokens == len(ref.input_ids)
    finally:
        node.stop_workers()
        for s in spinners:
            s.stop()
        node.destroy_node()
        probe.destroy_node()

"""BlueLM-V ONNX runtime: export, bundle checks, parity with PyTorch, generation features.

One tiny random-weight model (``configs/tiny-test.json``, weights scaled up so greedy
argmax margins are decisive) is exported once per module to FP32 + INT8 vision and
FP32 + INT4 decoder graphs; every test runs against that bundle.
"""

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('tokenizers')

from bluelm_ros.runtime.vlm.bundle import (Bundle, BundleError, DecoderIO,  # noqa: E402
                                           VisionIO)
from bluelm_ros.runtime.vlm.decoder import Decoder  # noqa: E402
from bluelm_ros.runtime.vlm.dynamic_resolution import DynamicResolution  # noqa: E402
from bluelm_ros.runtime.vlm.engine import VLMEngine  # noqa: E402
from bluelm_ros.runtime.vlm.gqa_decoder import GqaDecoder  # noqa: E402
from bluelm_ros.runtime.vlm.image_encoder import ImageEmbedding  # noqa: E402
from bluelm_ros.runtime.vlm.kv_buffer_decoder import KVBufferDecoder  # noqa: E402
from bluelm_ros.runtime.vlm.results import ContextOverflowError, Interrupted  # noqa: E402
from bluelm_ros.runtime.vlm.sampling import sample_token  # noqa: E402
from bluelm_ros.tools.vlm.configs import load_config  # noqa: E402
from bluelm_ros.tools.vlm.export import ExportOptions, export_bundle  # noqa: E402
from bluelm_ros.tools.vlm.modeling import BlueLMV  # noqa: E402

NEW = 24


def _sharpen(model, seed=0):
    """Larger random weights: decisive argmax margins, so FP32 parity is exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith('bias'):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * (0.6 / max(1.0, p.shape[-1] ** 0.5)))
    return model


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    # smooth random image (a few blobs) so the tiles are not pure noise
    small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    import cv2
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = _sharpen(BlueLMV(load_config('tiny-test')).eval())
    out = str(tmp_path_factory.mktemp('bundle'))
    export_bundle(model, out, ExportOptions())
    return model, out


@pytest.fixture(scope='module')
def fp32(tiny):
    return VLMEngine(tiny[1], vision_precision='fp32', decoder_precision='fp32', threads=1)


@pytest.fixture(scope='module')
def quant(tiny):
    return VLMEngine(tiny[1], vision_precision='int8', decoder_precision='int4', threads=1)


def _torch_greedy(model, ids, image=None, n=NEW):
    tiles = None
    if image is not None:
        tiles = torch.from_numpy(DynamicResolution.from_config(model.config)(image).tiles)
    return model.generate_greedy(torch.tensor(ids)[None], pixel_values=tiles,
                                 max_new_tokens=n, eos_token_ids=[], return_logits=True)


# ---------------------------------------------------------------------------
# bundle


def test_bundle_layout_and_manifest(tiny):
    b = Bundle(tiny[1])
    assert b.manifest['format'] == 'bluelm-v-onnx' and b.manifest['format_version'] == 1
    assert b.precisions('vision') == ['fp32', 'int8']
    assert b.precisions('decoder') == ['fp32', 'int4']
    q = b.entry('decoder', 'int4')['quantization']
    assert q == {'method': 'MatMulNBits', 'bits': 4, 'block_size': 32, 'symmetric': True,
                 'accuracy_level': 4, 'lm_head': 'int8'}
    for name in ('config.json', 'tokenizer.json', 'embed_tokens.npy', 'decoder_int4.onnx',
                 'decoder_int4.onnx.data', 'vision_int8.onnx'):
        assert name in b.files and len(b.files[name]['sha256']) == 64
    b.verify()
    sizes = b.describe()
    assert sizes['decoder_int4'] < sizes['decoder_fp32']


def test_corrupt_or_missing_file_is_refused(tiny, tmp_path):
    dst = str(tmp_path / 'b')
    shutil.copytree(tiny[1], dst)
    path = os.path.join(dst, 'decoder_fp32.onnx.data')
    with open(path, 'r+b') as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r'decoder_fp32\.onnx\.data: sha256 mismatch.*'
                                          r're-export'):
        VLMEngine(dst, decoder_precision='fp32')
    VLMEngine(dst, decoder_precision='int4', vision_precision='int8')  # other files are fine
    os.remove(os.path.join(dst, 'vision_int8.onnx.data'))
    with pytest.raises(BundleError, match=r'vision_int8\.onnx\.data: file missing'):
        VLMEngine(dst, decoder_precision='int4', vision_precision='int8')
    with open(os.path.join(dst, 'embed_tokens.npy'), 'ab') as f:
        f.write(b'x')
    with pytest.raises(BundleError, match=r'embed_tokens\.npy: size'):
        Bundle(dst, verify='size').verify(['embed_tokens.npy'])
    with pytest.raises(BundleError, match='no int8 decoder'):
        VLMEngine(dst, decoder_precision='int8')
    os.remove(os.path.join(dst, 'manifest.json'))
    with pytest.raises(BundleError, match='manifest not found'):
        Bundle(dst)


def test_graph_names_come_from_the_manifest_and_old_manifests_still_load(tiny, quant,
                                                                         tmp_path):
    b = Bundle(tiny[1])
    io = b.decoder_io('int4')
    assert io == DecoderIO.for_layers(b.config.text.num_hidden_layers, 'float32')
    assert io.layer(1)[0].past == 'past_key_values.1.key'
    assert b.entry('decoder', 'int4')['io']['cache'][0]['present'] == 'present.0.key'
    assert b.vision_io('int8') == VisionIO()
    # A bundle exported before the names were recorded (the shipped one is such a bundle).
    old = str(tmp_path / 'old')
    shutil.copytree(tiny[1], old)
    with open(os.path.join(old, 'manifest.json')) as f:
        manifest = json.load(f)
    for comp in ('vision', 'decoder'):
        for entry in manifest['components'][comp].values():
            del entry['io']
    with open(os.path.join(old, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    assert Bundle(old).decoder_io('int4') == io
    image = _image(300, 700, seed=11)
    kw = dict(max_new_tokens=10, stop_token_ids=[], reuse_prefix=False)
    got = VLMEngine(old, threads=1, verify='size').generate('what is it ?', image=image, **kw)
    assert got.tokens == quant.generate('what is it ?', image=image, **kw).tokens
    # Names the graph does not have are refused, naming the fix.
    manifest['components']['decoder']['int4']['io'] = dict(
        io.to_entry(), cache=[dict(t, past=t['past'] + '_x') for t in io.to_entry()['cache']])
    with open(os.path.join(old, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    with pytest.raises(BundleError, match=r'past_key_values\.0\.key_x.*Re-export'):
        VLMEngine(old, threads=1, verify='size').load(vision=False)


class RecomputingDecoder(Decoder):
    """A second backend through the decoder interface: no KV reuse at all.

    Every call runs the whole sequence again from an empty cache on the bundle's graph,
    the way a stateless backend would; only the interface's bookkeeping is shared.
    """

    def __init__(self, inner):
        super().__init__(inner.max_context)
        self.inner, self.rows = inner, []  # one embedding row per cached token

    @classmethod
    def from_bundle(cls, bundle, precision, max_context, kv_block, providers, **options):
        return cls(KVBufferDecoder.from_bundle(bundle, precision, max_context, kv_block,
                                               providers, **options))

    def _append(self, embeds):
        self.rows.extend(embeds)
        self.inner.reset()
        return self.inner.step(np.stack(self.rows), list(range(len(self.rows))))

    def _truncate(self, n):
        del self.rows[n:]

    def close(self):
        self.inner.close()


def test_a_second_decoder_backend_gives_the_same_answers(tiny, quant):
    eng = VLMEngine(tiny[1], threads=1, verify='size',
                    decoder_factory=RecomputingDecoder.from_bundle)
    image = _image(500, 400, seed=12)
    kw = dict(max_new_tokens=6, stop_token_ids=[])
    for question in ('what is it ?', 'and the colour ?'):  # the second reuses the prefix
        got = eng.generate(question, image=image, **kw)
        ref = quant.generate(question, image=image, reuse_prefix=False, **kw)
        assert got.tokens == ref.tokens
    assert got.timings.reused_prefix_tokens > got.timings.image_tokens
    assert isinstance(eng.decoder, RecomputingDecoder)
    assert eng.cached_tokens == len(eng.decoder.rows)


# ---------------------------------------------------------------------------
# parity with PyTorch


@pytest.mark.parametrize('layout', ['kv_buffer', 'gqa'])
@pytest.mark.parametrize('shape', [(300, 700), (500, 400), None])
def test_fp32_greedy_tokens_match_torch(tiny, request, layout, shape):
    model = tiny[0]
    eng = (request.getfixturevalue('fp32') if layout == 'kv_buffer'
           else request.getfixturevalue('gqa')['fp32-gqa'])
    image = _image(*shape, seed=shape[0]) if shape else None
    emb = eng.encode_image(image) if shape else None
    ids = eng.build_prompt('what is on the table ?', emb)
    ref, ref_logits = _torch_greedy(model, ids, image)
    res = eng.generate('what is on the table ?', image=image, max_new_tokens=NEW,
                       stop_token_ids=[], reuse_prefix=False)
    assert res.tokens == ref
    got = eng.teacher_forced_logits(ids, ref[:-1], emb)
    assert np.abs(got - ref_logits.numpy()).max() < 1e-3
    if shape:
        assert res.timings.image_tiles == emb.num_tiles and res.timings.image_cached
    if layout == 'gqa':
        for chunk in (1, 3, 128):  # chunked prefill into the shared buffer
            r = eng.generate_ids(ids, emb, max_new_tokens=12, stop_token_ids=[],
                                 prefill_chunk=chunk, reuse_prefix=False)
            assert r.tokens == ref[:12]


def test_int8_vision_int4_decoder_agreement(tiny, fp32, quant):
    """Report (and bound) how far the quantized graphs drift from PyTorch FP32."""
    model = tiny[0]
    agree, cosines, vis_cos = [], [], []
    for seed, shape in enumerate([(300, 700), (500, 400), (384, 384)]):
        image = _image(*shape, seed=seed)
        e32, e8 = fp32.encode_image(image), quant.encode_image(image)
        vis_cos.append(float(np.sum(e32.embeds * e8.embeds)
                             / np.linalg.norm(e32.embeds) / np.linalg.norm(e8.embeds)))
        ids = fp32.build_prompt('describe the image', e32)
        ref, ref_logits = _torch_greedy(model, ids, image)
        got = quant.teacher_forced_logits(ids, ref[:-1], e8)
        ref_logits = ref_logits.numpy()
        agree.append(float(np.mean(got.argmax(-1) == np.asarray(ref))))
        cosines.append(float(np.mean(np.sum(got * ref_logits, -1) / np.linalg.norm(got, axis=-1)
                                     / np.linalg.norm(ref_logits, axis=-1))))
    print(f'\nINT8 vision embedding cosine {np.mean(vis_cos):.5f}; INT4 decoder (teacher-'
          f'forced) token agreement {np.mean(agree):.3f}, logit cosine {np.mean(cosines):.5f}')
    assert np.mean(vis_cos) > 0.99
    assert np.mean(cosines) > 0.95
    assert np.mean(agree) > 0.6


def test_chunked_prefill_matches_one_shot(fp32):
    image = _image(300, 700, seed=3)
    emb = fp32.encode_image(image)
    ids = fp32.build_prompt('which way is left ?', emb)
    runs = {}
    for chunk in (1, 3, 128, 10_000):
        res = fp32.generate_ids(ids, emb, max_new_tokens=12, stop_token_ids=[],
                                prefill_chunk=chunk, reuse_prefix=False)
        runs[chunk] = res.tokens
        logits = fp32.teacher_forced_logits(ids, [], emb, prefill_chunk=chunk)
        if chunk == 1:
            base = logits
        assert np.abs(logits - base).max() < 1e-4
    assert runs[1] == runs[3] == runs[128] == runs[10_000]


def test_prefix_kv_reuse_matches_fresh_run(fp32):
    image = _image(500, 400, seed=4)
    fp32.reset()
    first = fp32.generate('what is this ?', image=image, max_new_tokens=8, stop_token_ids=[])
    assert first.timings.reused_prefix_tokens == 0 and not first.timings.image_cached
    second = fp32.generate('where is the cat ?', image=image, max_new_tokens=8,
                           stop_token_ids=[])
    n_img = second.timings.image_tokens
    assert second.timings.image_cached
    assert second.timings.reused_prefix_tokens > n_img  # BOS + template + image reused
    fresh = fp32.generate('where is the cat ?', image=image, max_new_tokens=8,
                          stop_token_ids=[], reuse_prefix=False)
    assert fresh.timings.reused_prefix_tokens == 0
    assert second.tokens == fresh.tokens
    # prepare(): prefix prefilled before the question is known
    fp32.reset()
    key = VLMEngine.image_key(image)
    cached = fp32.prepare(image_key=key, system='you are a robot')
    assert cached > n_img
    res = fp32.generate('where is the cat ?', image_key=key, system='you are a robot',
                        max_new_tokens=8, stop_token_ids=[])
    assert res.timings.reused_prefix_tokens == cached
    ref = fp32.generate('where is the cat ?', image_key=key, system='you are a robot',
                        max_new_tokens=8, stop_token_ids=[], reuse_prefix=False)
    assert res.tokens == ref.tokens
    # a different image shares only the text before the image
    other = fp32.generate('where is the cat ?', image=_image(500, 400, seed=5),
                          max_new_tokens=2, stop_token_ids=[])
    assert other.timings.reused_prefix_tokens < 10


def test_kv_buffer_growth_keeps_tokens(tiny):
    """Growing the KV view in small steps (in-place relayout) changes nothing."""
    image = _image(500, 400, seed=9)
    runs = []
    for block, kv in ((8, 'int4'), (4096, 'int4'), (8, 'fp32'), (4096, 'fp32')):
        eng = VLMEngine(tiny[1], decoder_precision=kv, threads=1, kv_block=block, verify='none')
        runs.append(eng.generate('describe it', image=image, max_new_tokens=40,
                                 stop_token_ids=[]).tokens)
        if block == 8:
            cap = eng.decoder.capacity
            assert cap % 8 == 0 and cap - eng.cached_tokens < 8
    assert runs[0] == runs[1] and runs[2] == runs[3]


# ---------------------------------------------------------------------------
# generation features


def test_streaming_concatenation_equals_text(quant):
    image = _image(300, 700, seed=6)
    pieces, ids = [], []

    def on_token(delta, tok):
        pieces.append(delta)
        ids.append(tok)

    res = quant.generate('describe it', image=image, max_new_tokens=40, stop_token_ids=[],
                         on_token=on_token)
    assert ''.join(pieces) == res.text
    assert [t for t in ids if t >= 0] == res.tokens
    assert res.text == quant.tokenizer.decode(res.tokens)
    assert res.timings.generated_tokens == 40 and res.timings.tokens_per_second > 0


def test_stop_strings(quant):
    full = quant.generate('describe it', max_new_tokens=40, stop_token_ids=[])
    text = full.text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip())
    pieces = []
    res = quant.generate('describe it', max_new_tokens=40, stop_token_ids=[],
                         stop_strings=['\x00never', stop], on_token=lambda d, t: pieces.append(d))
    assert res.stop_reason == 'stop_string'
    assert res.text == text[:text.find(stop)]
    assert ''.join(pieces) == res.text
    assert len(res.tokens) < len(full.tokens)


def test_eos_and_max_new_tokens(quant):
    ref = quant.generate('describe it', max_new_tokens=10, stop_token_ids=[])
    assert ref.stop_reason == 'max_new_tokens' and len(ref.tokens) == 10
    res = quant.generate('describe it', max_new_tokens=10, stop_token_ids=[ref.tokens[3]])
    k = ref.tokens.index(ref.tokens[3])
    assert res.stop_reason == 'eos' and res.tokens == ref.tokens[:k + 1]


def test_cancellation_between_tokens(quant):
    event = threading.Event()
    seen = []

    def on_token(delta, tok):
        seen.append(tok)
        if len(seen) == 3:
            event.set()  # e.g. a ROS action cancel arriving from another thread

    res = quant.generate('describe it', max_new_tokens=30, stop_token_ids=[],
                         on_token=on_token, cancel=event)
    assert res.stop_reason == 'cancelled' and len(res.tokens) == 3
    res = quant.generate('describe it', max_new_tokens=30, stop_token_ids=[],
                         on_token=lambda d, t: len(seen) < 0)
    assert res.stop_reason == 'cancelled' and len(res.tokens) == 1
    # the KV cache stays usable after a cancelled generation
    again = quant.generate('describe it', max_new_tokens=5, stop_token_ids=[])
    fresh = quant.generate('describe it', max_new_tokens=5, stop_token_ids=[],
                           reuse_prefix=False)
    assert again.tokens == fresh.tokens


def test_sampling_is_seeded(quant):
    kw = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.5, top_k=50, top_p=0.95)
    a = quant.generate('describe it', seed=1, **kw)
    b = quant.generate('describe it', seed=1, **kw)
    c = quant.generate('describe it', seed=2, **kw)
    g = quant.generate('describe it', max_new_tokens=16, stop_token_ids=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert quant.generate('describe it', seed=3, max_new_tokens=16, stop_token_ids=[],
                          temperature=1.0, top_k=1).tokens == g.tokens
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert sample_token(logits) == 1
    assert {sample_token(logits, 1.0, top_p=0.01, rng=rng) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, top_k=2, rng=rng) for _ in range(200)} == {1, 2}


def test_context_overflow(tiny):
    eng = VLMEngine(tiny[1], vision_precision='int8', decoder_precision='int4', threads=1,
                    max_context=40, verify='size')
    image = _image(300, 700, seed=7)  # 2:1 grid + thumbnail = 3 tiles = 48 image tokens
    with pytest.raises(ContextOverflowError, match=r'prompt of \d+ tokens \(48 of them image '
                                                   r'tokens from 3 tiles.*context of 40'):
        eng.generate('what is this ?', image=image)
    res = eng.generate('hi', max_new_tokens=100, stop_token_ids=[])
    assert res.stop_reason == 'context_full'
    assert res.timings.prompt_tokens + len(res.tokens) == 41  # last token has no KV slot


def test_image_cache_and_vision_release(tiny):
    eng = VLMEngine(tiny[1], threads=1, image_cache_size=2, release_vision=True,
                    verify='size')
    imgs = [_image(200, 300, seed=s) for s in range(3)]
    e0 = eng.encode_image(imgs[0], key='f0')
    assert not eng.images.loaded  # freed after encoding
    assert eng.encode_image(imgs[0], key='f0') is e0  # cached, no re-encode
    eng.encode_image(imgs[1], key='f1')
    eng.encode_image(imgs[2], key='f2')
    assert eng.cached_image('f0') is None and eng.cached_image('f2') is not None
    with pytest.raises(KeyError, match='f0'):
        eng.generate('hi', image_key='f0')
    res = eng.generate('hi', image=e0, max_new_tokens=2)
    assert isinstance(e0, ImageEmbedding) and res.timings.image_cached


def test_runtime_does_not_import_torch():
    code = ('import sys; import bluelm_ros.runtime.vlm.engine, bluelm_ros.runtime.vlm.bundle; '
            'assert "torch" not in sys.modules, "torch imported"')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _agreement(engine, base, seed=8):
    """Teacher-forced token agreement and mean logit cosine of ``engine`` vs ``base``
    on ``base``'s own greedy answer about one image."""
    emb = base.encode_image(_image(300, 700, seed=seed))
    ids = base.build_prompt('describe the image', emb)
    ref = base.generate_ids(ids, emb, max_new_tokens=16, stop_token_ids=[],
                            reuse_prefix=False)
    got = engine.teacher_forced_logits(ids, ref.tokens[:-1], emb)
    want = base.teacher_forced_logits(ids, ref.tokens[:-1], emb)
    agree = float(np.mean(got.argmax(-1) == np.asarray(ref.tokens)))
    cos = float(np.mean(np.sum(got * want, -1) / np.linalg.norm(got, axis=-1)
                        / np.linalg.norm(want, axis=-1)))
    return agree, cos


@pytest.mark.parametrize('kv', ['float16', 'int8'])
def test_reduced_precision_kv_cache(tiny, quant, kv):
    """FP16 / INT8 KV caches (memory options) stay close to the FP32-cache INT4 decoder."""
    model, path = tiny
    export_bundle(model, path, ExportOptions(vision=(), decoder=('int4',), kv_dtype=kv,
                                             variant=f'kv-{kv}'), update=True)
    b = Bundle(path)
    assert b.entry('decoder', f'int4-kv-{kv}')['kv_dtype'] == kv
    assert 'int8' in b.precisions('vision')  # the update kept the other graphs
    eng = VLMEngine(path, decoder_precision=f'int4-kv-{kv}', threads=1)
    agree, cos = _agreement(eng, quant)
    print(f'\n{kv} KV vs float32 KV (INT4 decoder): token agreement {agree:.3f}, '
          f'logit cosine {cos:.5f}')
    assert cos > 0.99 and agree > 0.8
    dtype = {'float16': np.float16, 'int8': np.int8}[kv]
    assert eng.decoder.buffers['past_key_values.0.key'].dtype == dtype


# ---------------------------------------------------------------------------
# the fused GroupQueryAttention decoder (export --attention gqa) and the fused vision tower


@pytest.fixture(scope='module')
def gqa(tiny):
    """The tiny bundle plus gqa decoders: fp32 + int4 with an fp32 cache, int4 with fp16."""
    model, path = tiny
    export_bundle(model, path, ExportOptions(vision=(), attention='gqa', variant='gqa'),
                  update=True)
    export_bundle(model, path, ExportOptions(vision=(), decoder=('int4',), attention='gqa',
                                             kv_dtype='float16', variant='gqa-kv16'),
                  update=True)
    return {key: VLMEngine(path, vision_precision='fp32', decoder_precision=key, threads=1)
            for key in ('fp32-gqa', 'int4-gqa', 'int4-gqa-kv16')}


def test_gqa_manifest_and_backend(tiny, gqa):
    b = Bundle(tiny[1])
    entry = b.entry('decoder', 'int4-gqa')
    assert entry['attention'] == 'gqa' and b.decoder_attention('int4') == 'kv_buffer'
    assert 'shared buffer' in entry['kv_layout']
    eng = gqa['int4-gqa']
    eng.generate('hi', max_new_tokens=2, stop_token_ids=[])
    assert isinstance(eng.decoder, GqaDecoder)
    # one buffer per layer and K/V, reserved whole: [1, kv_heads, max_context, head_dim]
    n, t = b.config.text.num_hidden_layers, b.config.text
    assert len(eng.decoder.buffers) == 2 * n
    assert eng.decoder.buffers['past_key_values.0.value'].shape == (
        1, t.num_key_value_heads, eng.max_context, t.head_dim)
    with pytest.raises(ValueError, match='int8 cache needs calibrated'):
        ExportOptions(attention='gqa', kv_dtype='int8').validate()
    # a kv_buffer graph opened as gqa (or a layout this runtime lacks) names the fix
    with pytest.raises(BundleError, match=r'not a gqa decoder graph.*--attention gqa'):
        GqaDecoder.from_bundle(b, 'int4', 64)
    with open(os.path.join(tiny[1], 'manifest.json')) as f:
        manifest = json.load(f)
    manifest['components']['decoder']['int4-gqa']['attention'] = 'paged'
    b.manifest = manifest
    b.components = manifest['components']
    with pytest.raises(BundleError, match="attention 'paged'.*knows"):
        VLMEngine(b, decoder_precision='int4-gqa', threads=1).load(vision=False)


def test_gqa_prefix_reuse_matches_fresh_run(gqa):
    eng = gqa['fp32-gqa']
    image = _image(500, 400, seed=4)
    eng.reset()
    key = VLMEngine.image_key(image)
    eng.encode_image(image, key=key)
    cached = eng.prepare(image_key=key)
    kw = dict(image_key=key, max_new_tokens=8, stop_token_ids=[])
    first = eng.generate('where is the cat ?', **kw)
    second = eng.generate('what colour is it ?', **kw)  # overwrites the first's slots
    assert first.timings.reused_prefix_tokens == cached
    assert second.timings.reused_prefix_tokens >= cached
    assert second.tokens == eng.generate('what colour is it ?', reuse_prefix=False,
                                         **kw).tokens


def test_gqa_int4_decoder_gives_the_old_int4_decoders_tokens(quant, gqa):
    """Same weights, same MatMulNBits: only the attention kernel differs."""
    for seed, shape in enumerate([(300, 700), (500, 400), (384, 384)]):
        emb = quant.encode_image(_image(*shape, seed=seed))
        ids = quant.build_prompt('describe the image', emb)
        kw = dict(max_new_tokens=NEW, stop_token_ids=[], reuse_prefix=False)
        old = quant.generate_ids(ids, emb, **kw)
        assert gqa['int4-gqa'].generate_ids(ids, emb, **kw).tokens == old.tokens


def test_gqa_fp16_kv_cache(gqa):
    eng = gqa['int4-gqa-kv16']
    agree, cos = _agreement(eng, gqa['int4-gqa'])
    print(f'\ngqa fp16 KV vs fp32 KV (INT4): token agreement {agree:.3f}, cosine {cos:.5f}')
    assert cos > 0.999 and agree > 0.9
    assert eng.decoder.buffers['past_key_values.0.key'].dtype == np.float16


def test_fused_vision_graph_matches_the_plain_one(tiny, fp32):
    """The tiny bundle's vision graphs are fused (the default); a plain export agrees."""
    model, path = tiny
    b = Bundle(path)
    fusion = b.entry('vision', 'fp32')['fusion']
    assert fusion['ops']['Attention'] == b.config.vision.num_hidden_layers
    assert 'Attention' in b.entry('vision', 'int8')['quantization']['ops']
    export_bundle(model, path, ExportOptions(vision=('fp32',), decoder=(),
                                             vision_fusion=False, vision_variant='plain'),
                  update=True)
    plain = VLMEngine(path, vision_precision='fp32-plain', decoder_precision='fp32',
                      threads=1, verify='size')
    assert Bundle(path).entry('vision', 'fp32-plain')['fusion'] is None
    image = _image(500, 400, seed=21)
    a, c = fp32.encode_image(image).embeds, plain.encode_image(image).embeds
    assert np.abs(a - c).max() < 1e-4


def test_low_memory_mode_frees_the_kv_cache_before_a_new_image(tiny, gqa):
    """release_vision: the KV buffers are freed before a new image is encoded; the
    answers stay the same (the new image's prompt is prefilled from scratch anyway)."""
    eng = VLMEngine(tiny[1], vision_precision='fp32', decoder_precision='int4-gqa',
                    threads=1, release_vision=True, verify='size')
    a, b = _image(300, 700, seed=31), _image(500, 400, seed=32)
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    eng.generate('what is it ?', image=a, **kw)
    assert eng.decoder.buffers and eng.cached_tokens > 0
    eng.encode_image(b)
    assert not eng.decoder.buffers and eng.cached_tokens == 0
    eng.encode_image(b)  # cached: nothing is freed
    got = eng.generate('and this ?', image=b, **kw)
    assert got.tokens == gqa['int4-gqa'].generate('and this ?', image=b, reuse_prefix=False,
                                                  **kw).tokens
    assert eng.decoder.buffers


def test_prepare_gives_way_to_a_request_and_keeps_what_it_did(tiny):
    eng = VLMEngine(tiny[1], threads=1, prefill_chunk=4, verify='size')
    image = _image(500, 400, seed=41)
    key = VLMEngine.image_key(image)
    with pytest.raises(Interrupted):  # before the first tile batch: nothing kept
        eng.prepare(image, image_key=key, cancel=lambda: True)
    assert eng.cached_image(key) is None and eng.cached_tokens == 0
    eng.encode_image(image, key=key)
    checks = []

    def after_two_chunks():
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(Interrupted, match='after 8 of'):
        eng.prepare(image_key=key, cancel=after_two_chunks)
    assert eng.cached_tokens == 8
    kw = dict(image_key=key, max_new_tokens=6, stop_token_ids=[])
    res = eng.generate('what is it ?', **kw)
    assert res.timings.reused_prefix_tokens == 8
    assert res.tokens == eng.generate('what is it ?', reuse_prefix=False, **kw).tokens
    assert eng.prepare(image_key=key) > 8  # uninterrupted, it finishes

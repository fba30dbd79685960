"""BlueLM-V runtime benchmark: full 3B shapes, random weights, ONNX Runtime vs llama.cpp.

Every timing is interleaved (``harness.py``: contenders take turns, >= 5 rounds, min and
median, per-round ratios, load average recorded), each section in a fresh process:

* ``vision``: vision graphs x tile batch sizes (each call encodes the same 4 smooth
  tiles), plus each graph's embedding cosine to the FP32 graph;
* ``decode``: the bundle's decoders and llama.cpp (llama-cpp-python, same-shape random
  LLaMA GGUF, Q4_0 with lm_head Q8_0, f16 KV) in one process: decode at 2048 tokens of
  context and after a 128-token prompt (8 greedy steps per call, rewound each call), then
  prefill of the 2048-token prompt in chunks of 128; KV cache bytes per decoder;
* ``pipeline``: the robot's flow per decoder (peak RSS; a frame encoded and its prefix
  prefilled eagerly, then 32-token questions: time to first token; a new frame with a
  context-filling question: encode + prefill + first token);
* ``genai`` (optional): our export vs onnxruntime-genai on a 4-layer slice (pre-harness).

Make the bundle first (random weights; nothing is downloaded; ~10 min)::

    B=~/.cache/bluelm_ros/bundles/bluelm-v-3b-random
    python -m bluelm_ros.tools.vlm.export --random bluelm-v-3b $B --vision fp32,int8 \
        --no-vision-fusion --decoder int4 --block-size 128 --lm-head int4 --kv-dtype int8 \
        --variant b128-kv8 --embed-dtype float16
    python -m bluelm_ros.tools.vlm.export --random bluelm-v-3b $B --update \
        --vision fp32,int8 --vision-variant fused --decoder ''
    for kv in 16 32; do python -m bluelm_ros.tools.vlm.export --random bluelm-v-3b $B \
        --update --vision '' --decoder int4 --block-size 128 --lm-head int4 \
        --attention gqa --kv-dtype float$kv --variant b128-gqa$kv; done

and ``pip install llama-cpp-python==0.3.36 gguf`` (builds from source, ~10 min). Then
``python bench/bench_vlm.py`` on a quiet machine. Results: ``bench/results/vlm.json``
(``headline`` holds the figures) and ``vlm.png``. Model files stay under ``~/.cache``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, machine, plot_path, save  # noqa: E402
from harness import interleaved  # noqa: E402

DEFAULT_BUNDLE = os.path.join(os.path.dirname(CACHE), 'bundles', 'bluelm-v-3b-random')
DEFAULT_GGUF = os.path.join(CACHE, 'bluelm-v-3b-llm-random-q4_0.gguf')


def peak_rss_mb():
    """Peak resident set size of this process image so far (MiB).

    ``VmHWM`` is reset by exec; ``ru_maxrss`` is not (a child would report its parent's
    RSS at fork time if that was larger).
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Start a new peak-RSS window (Linux: ``5`` to clear_refs resets ``VmHWM``)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def rss_mb():
    """Current resident set size (MiB)."""
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def child(args, mode, **kw):
    """Run one scenario in a fresh interpreter (clean peak RSS); return its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), '--child', mode,
           '--bundle', args.bundle, '--threads', str(args.threads),
           '--context', str(args.context), '--decode-tokens', str(args.decode_tokens),
           '--rounds', str(args.rounds), '--gguf', args.gguf, '--kw', json.dumps(kw)]
    env = dict(os.environ)
    # ORT runs with spinning off (the cores are shared); give llama.cpp's OpenMP threads
    # the same passive wait, which on busy cores was 4x faster for it here
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    t = time.perf_counter()
    # stdout carries the JSON; the child's tables and errors go straight to the terminal
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        print(r.stdout[-3000:], file=sys.stderr)
        return {'error': f'{mode} child exited with {r.returncode}'}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f'[{mode} {kw or ""}] {time.perf_counter() - t:.0f} s: {json.dumps(out)}', flush=True)
    return out


# ---------------------------------------------------------------------------
# ONNX Runtime scenarios (children)


def _engine(args, **kw):
    from bluelm_ros.runtime.vlm.engine import VLMEngine
    return VLMEngine(args.bundle, threads=args.threads, verify='size',
                     decoder_precision=args.kw.get('decoder', 'int4'),
                     max_context=args.context + args.decode_tokens, **kw)


def _prompt_ids(engine, emb, n_total):
    """Chat prompt with exactly ``n_total`` tokens (question padded; byte tokenizer)."""
    base = len(engine.build_prompt('', emb))
    q = ('describe the scene in front of the robot and list every object on the table '
         * 20)[:max(0, n_total - base)]
    ids = engine.build_prompt(q, emb)
    assert len(ids) == n_total, (len(ids), n_total)
    return ids, q


def _tiles(n, size, seed=0):
    """``n`` smooth random tiles in the vision graph's input range (not pure noise)."""
    import cv2
    rng = np.random.default_rng(seed)
    out = [cv2.resize(rng.uniform(-1, 1, (6, 6, 3)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1) for _ in range(n)]
    return np.ascontiguousarray(np.stack(out))


def _cosines(a, b):
    """Cosine similarity per tile of two ``[tiles, tokens, hidden]`` embeddings."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).tolist()


def run_vision(args):
    """Vision graphs and tile batch sizes, interleaved; each call encodes the same 4 tiles.

    Also each graph's embedding cosine to the FP32 graph on those tiles.
    """
    from bluelm_ros.runtime.ort_session import create_session
    from bluelm_ros.runtime.vlm.bundle import Bundle
    b = Bundle(args.bundle, verify='size')
    io = b.vision_io('fp32')
    tiles = _tiles(4, b.config.vision.image_size)
    fp32, _ = create_session(b.component_files('vision', 'fp32')[0], threads=args.threads)
    reference = fp32.run(None, {io.pixel_values: tiles})[0]
    del fp32
    sessions, out = {}, {'load_ms': {}, 'cosine_vs_fp32': {}, 'graphs': {}}
    for prec in args.kw['precisions']:
        t = time.perf_counter()
        sessions[prec], _ = create_session(b.component_files('vision', prec)[0],
                                           threads=args.threads)
        out['load_ms'][prec] = (time.perf_counter() - t) * 1e3
        emb = sessions[prec].run(None, {io.pixel_values: tiles})[0]
        out['cosine_vs_fp32'][prec] = min(_cosines(emb, reference))
        out['graphs'][prec] = {k: v for k, v in b.entry('vision', prec).items()
                               if k in ('quantization', 'fusion')}

    def encode(session, batch):
        def call():
            for i in range(0, len(tiles), batch):
                session.run(None, {io.pixel_values: tiles[i:i + batch]})
        return call

    contenders = {f'{prec} batch {bs}': encode(sessions[prec], bs)
                  for prec, bs in args.kw['contenders']}
    comp = interleaved(contenders, rounds=args.rounds, calls=1, warmup=1)
    print(comp.table(), file=sys.stderr)
    out['comparison'] = comp.to_dict()
    out['ms_per_tile'] = {n: {'min': c.min_ms / len(tiles), 'median': c.median_ms / len(tiles)}
                          for n, c in comp.contenders.items()}
    return out


class LlamaCpp:
    """llama-cpp-python on the same-shape random GGUF, driven like our engine."""

    def __init__(self, args, chunk=128):
        from llama_cpp import Llama
        self.llm = Llama(args.gguf, n_ctx=args.context + args.decode_tokens, n_batch=chunk,
                         n_ubatch=chunk, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, ids, steps):
        """Rewind to all but the last prompt token, then ``steps`` greedy steps."""
        self.llm.n_tokens = len(ids) - 1
        tok = ids[-1]
        for _ in range(steps):
            self.llm.eval([tok])
            tok = _llama_argmax(self.llm)


def run_decode(args):
    """Decoders and llama.cpp in one process, interleaved: decode at full and at short
    context (``decode_steps`` tokens per call), then prefill of the full prompt."""
    engines = {d: _engine(argparse.Namespace(**{**vars(args), 'kw': {'decoder': d}}))
               for d in args.kw['decoders']}
    llama = LlamaCpp(args) if args.kw.get('llama') else None
    rng = np.random.default_rng(0)
    # token ids < 259: valid for the byte tokenizer and for the GGUF's vocab alike
    ids = [1] + rng.integers(3, 250, args.context - 1).tolist()
    short = ids[:args.kw.get('short', 128)]
    steps = args.kw.get('decode_steps', 8)
    out = {'decode_steps_per_call': steps, 'context': len(ids), 'short_context': len(short)}

    def ort_decode(eng, prompt):
        # the cache holds the prompt: reuse all but its last token, then steps - 1 more
        return lambda: eng.generate_ids(prompt, None, max_new_tokens=steps,
                                        stop_token_ids=[], reuse_prefix=True)

    def ort_prefill(eng):
        return lambda: eng.generate_ids(ids, None, max_new_tokens=1, stop_token_ids=[],
                                        prefill_chunk=128, reuse_prefix=False)

    for label, prompt in (('decode_at_context', ids), ('decode_short', short)):
        for eng in engines.values():
            eng.generate_ids(prompt, None, max_new_tokens=1, stop_token_ids=[],
                             reuse_prefix=False)
        contenders = {d: ort_decode(e, prompt) for d, e in engines.items()}
        if llama:
            llama.prefill(prompt)
            contenders['llama.cpp Q4_0'] = lambda p=prompt: llama.decode(p, steps)
        comp = interleaved(contenders, reference='llama.cpp Q4_0' if llama else None,
                           rounds=args.rounds, calls=2, warmup=1)
        print(label, '\n' + comp.table(), file=sys.stderr, flush=True)
        out[label] = comp.to_dict()
    prefill_names = args.kw.get('prefill_decoders') or list(engines)
    contenders = {d: ort_prefill(engines[d]) for d in prefill_names}
    if llama:
        contenders['llama.cpp Q4_0'] = lambda: llama.prefill(ids)
    comp = interleaved(contenders, reference='llama.cpp Q4_0' if llama else None,
                       rounds=args.rounds, calls=1, warmup=0)
    print('prefill\n' + comp.table(), file=sys.stderr, flush=True)
    out['prefill'] = comp.to_dict()
    out['kv_cache_mb_at_context'] = {d: _kv_bytes(e, len(ids)) / 2 ** 20
                                     for d, e in engines.items()}
    out['peak_rss_mb'] = peak_rss_mb()
    return out


def _kv_bytes(engine, tokens):
    """Bytes of KV cache (and int8 scales) that ``tokens`` tokens occupy."""
    total = 0
    for buf in engine.decoder.buffers.values():
        total += buf.dtype.itemsize * buf.shape[1] * buf.shape[3] * tokens
    return total


def run_pipeline(args):
    """The robot's flow in one fresh process: peak RSS, eager and new-frame latency.

    1. A frame arrives: the INT8 ViT encodes it (768x1536: 2:4 grid + thumbnail, 9 tiles;
       the session is released afterwards) and the prompt prefix up to the question is
       prefilled eagerly (``prepare``), as the scene-QA node does.
    2. ``questions`` questions of ``question_tokens`` tokens about that frame: time to
       first token each (they pay only for their own tokens).
    3. A new frame with a question that fills the context: encode + prefill + first
       token, then ``decode_tokens`` tokens (the KV cache at its full size).
    """
    eng = _engine(args, release_vision=True, low_memory=args.kw.get('low_memory', False),
                  vision_precision=args.kw.get('vision', 'int8'),
                  tile_batch_size=args.kw.get('tile_batch_size'))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1536, 768, 3), dtype=np.uint8) for _ in range(2)]
    phases, peaks = {'start': rss_mb()}, {}
    t = time.perf_counter()
    emb = eng.encode_image(frames[0], key='frame0')
    eng.prepare(image_key='frame0')
    eager_ms = (time.perf_counter() - t) * 1e3
    phases['after_eager'] = rss_mb()
    peaks['first frame: encode + eager prefill'] = peak_rss_mb()
    reset_peak_rss()
    n_q = args.kw.get('question_tokens', 32)
    base = len(eng.build_prompt('', emb))
    ttfts = []
    for i in range(args.kw.get('questions', 5)):
        question = (f'question {i}: what is on the table and where is the robot going now '
                    * 4)[:n_q]
        r = eng.generate(question, image_key='frame0', max_new_tokens=1, stop_token_ids=[])
        assert r.timings.prompt_tokens == base + n_q, (r.timings.prompt_tokens, base, n_q)
        ttfts.append(r.timings.time_to_first_token_ms)
    phases['after_questions'] = rss_mb()
    peaks['questions'] = peak_rss_mb()
    reset_peak_rss()
    _, question = _prompt_ids(eng, emb, args.context)
    r = eng.generate(question, image=frames[1], max_new_tokens=args.decode_tokens,
                     stop_token_ids=[])
    phases['after_new_frame'] = rss_mb()
    peaks['new frame: encode + full-context prefill + decode'] = peak_rss_mb()
    tm = r.timings
    return {'peak_rss_mb': max(peaks.values()), 'peak_rss_by_phase_mb': peaks,
            'rss_phases_mb': phases, 'low_memory': args.kw.get('low_memory', False),
            'tile_batch_size': eng.images.tile_batch_size,
            'eager_encode_and_prefill_ms': eager_ms, 'image_tiles': tm.image_tiles,
            'image_tokens': tm.image_tokens, 'question_tokens': n_q,
            'ttft_eager_ms': {'min': min(ttfts), 'median': float(np.median(ttfts)),
                              'all': ttfts},
            'new_frame': {'prompt_tokens': tm.prompt_tokens,
                          'image_encode_ms': tm.image_encode_ms, 'prefill_ms': tm.prefill_ms,
                          'ttft_ms': tm.time_to_first_token_ms,
                          'decode_tokens_per_second': tm.tokens_per_second},
            'kv_cache_mb': _kv_bytes(eng, tm.prompt_tokens + args.decode_tokens) / 2 ** 20}

# ---------------------------------------------------------------------------
# llama.cpp


def make_random_gguf(config_name, path, seed=0):
    """Write a random-weight LLaMA GGUF with the LLM's shape: Q4_0 (lm_head Q8_0)."""
    import gguf
    from gguf.quants import quantize
    from bluelm_ros.tools.vlm.configs import load_config
    t = load_config(config_name).text
    rng = np.random.default_rng(seed)
    tmp = path + '.tmp'
    w = gguf.GGUFWriter(tmp, 'llama')
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_hidden_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_rope_dimension_count(t.head_dim)
    w.add_rope_freq_base(t.rope_theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_vocab_size(t.vocab_size)
    # a dummy SentencePiece-style vocab: the benchmark feeds token ids, never text
    w.add_tokenizer_model('llama')
    w.add_token_list([f'<t{i}>' for i in range(t.vocab_size)])
    w.add_token_scores([0.0] * t.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * t.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    Q4, Q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0

    def add(name, shape, qtype=Q4):
        if qtype is None:
            w.add_tensor(name, np.ones(shape, np.float32))
            return
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    d, i, v = t.hidden_size, t.intermediate_size, t.vocab_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    add('token_embd.weight', (v, d))
    add('output_norm.weight', (d,), None)
    add('output.weight', (v, d), Q8)
    for n in range(t.num_hidden_layers):
        add(f'blk.{n}.attn_norm.weight', (d,), None)
        add(f'blk.{n}.attn_q.weight', (q, d))
        add(f'blk.{n}.attn_k.weight', (kv, d))
        add(f'blk.{n}.attn_v.weight', (kv, d))
        add(f'blk.{n}.attn_output.weight', (d, q))
        add(f'blk.{n}.ffn_norm.weight', (d,), None)
        add(f'blk.{n}.ffn_gate.weight', (i, d))
        add(f'blk.{n}.ffn_up.weight', (i, d))
        add(f'blk.{n}.ffn_down.weight', (d, i))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    os.replace(tmp, path)


def _llama_argmax(llm):
    # scores has only n_batch rows without logits_all: read the context's last logits
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


# ---------------------------------------------------------------------------
# onnxruntime-genai vs our decoder export, on an N-layer full-width slice of the LLM


def prepare_genai_slice(config_name, layers, root, block_size=32):
    """Build the same random N-layer slice twice: genai's builder and our exporter.

    Both quantize every MatMul, lm_head included, to 4 bits (block ``block_size``,
    symmetric for ours, ``accuracy_level=4``), as genai's builder does by default.
    """
    hf, og_dir, ours = (os.path.join(root, d) for d in ('hf', 'genai', 'ours'))
    from bluelm_ros.runtime.vlm.config import BlueLMVConfig
    from bluelm_ros.tools.vlm.configs import load_config
    from bluelm_ros.tools.vlm.export import (ExportOptions, export_bundle, random_model,
                                             write_byte_tokenizer)
    cfg = load_config(config_name)
    d = cfg.to_dict()
    d['text']['num_hidden_layers'] = layers
    d['name'] = f'{cfg.name}-{layers}-layer-slice'
    sl = BlueLMVConfig.from_dict(d)
    if not os.path.exists(os.path.join(ours, 'manifest.json')):
        export_bundle(random_model(sl), ours,
                      ExportOptions(vision=(), decoder=('int4',), block_size=block_size,
                                    lm_head='int4', embed_dtype='float16'))
    if not os.path.exists(os.path.join(og_dir, 'genai_config.json')):
        if not os.path.exists(os.path.join(hf, 'config.json')):
            from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
            t = sl.text
            LlamaForCausalLM(LlamaConfig(
                vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=layers,
                num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                max_position_embeddings=t.max_position_embeddings, rope_theta=t.rope_theta,
                rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)).save_pretrained(hf)
            write_byte_tokenizer(os.path.join(hf, 'tokenizer.json'), cfg)
            PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf, 'tokenizer.json'),
                                    bos_token='<s>', eos_token='</s>',
                                    pad_token='<pad>').save_pretrained(hf)
        subprocess.run([sys.executable, '-m', 'onnxruntime_genai.models.builder', '-i', hf,
                        '-o', og_dir, '-p', 'int4', '-e', 'cpu', '-c',
                        os.path.join(root, 'cache'), '--extra_options',
                        f'int4_block_size={block_size}', 'int4_accuracy_level=4'], check=True)
    return og_dir, ours


def run_genai(args):
    """Prefill (chunked) and decode with onnxruntime-genai on its own int4 export."""
    import onnxruntime_genai as og
    path = args.kw['dir']
    cfg_path = os.path.join(path, 'genai_config.json')
    with open(cfg_path) as f:
        gcfg = json.load(f)
    so = gcfg['model']['decoder'].setdefault('session_options', {})
    so.update(intra_op_num_threads=args.threads, inter_op_num_threads=1)
    with open(cfg_path, 'w') as f:
        json.dump(gcfg, f, indent=1)
    t = time.perf_counter()
    model = og.Model(path)
    out = {'load_ms': (time.perf_counter() - t) * 1e3, 'prefill': {}}
    ids = np.random.default_rng(0).integers(3, 250, args.context).astype(np.int32)
    for chunk in args.kw['chunks']:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=args.context + args.decode_tokens,
                                  do_sample=False, chunk_size=chunk)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        ms = (time.perf_counter() - t) * 1e3
        out['prefill'][str(chunk)] = {'ms': ms, 'tokens_per_second': len(ids) / ms * 1e3}
        gen.generate_next_token()  # first token: sampled from the prefill logits
        t = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            gen.generate_next_token()
        ms = (time.perf_counter() - t) * 1e3
        out['decode_tokens_per_second_at_context'] = (args.decode_tokens - 1) / ms * 1e3
        del gen
    out['peak_rss_mb'] = peak_rss_mb()
    return out


def run_slice(args):
    """Our engine on the slice bundle with the same prompt shape as :func:`run_genai`."""
    from bluelm_ros.runtime.vlm.engine import VLMEngine
    eng = VLMEngine(args.kw['dir'], threads=args.threads, verify='size',
                    max_context=args.context + args.decode_tokens).load(vision=False)
    ids = np.random.default_rng(0).integers(3, 250, args.context).tolist()
    out = {'prefill': {}}
    for chunk in args.kw['chunks']:
        r = eng.generate_ids(ids, None, max_new_tokens=args.decode_tokens, stop_token_ids=[],
                             prefill_chunk=chunk, reuse_prefix=False)
        out['prefill'][str(chunk)] = {'ms': r.timings.prefill_ms,
                                      'tokens_per_second': r.timings.prefill_tokens_per_second}
        out['decode_tokens_per_second_at_context'] = r.timings.tokens_per_second
    out['peak_rss_mb'] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------------
# report


def _ratio(section, name, reference='llama.cpp Q4_0'):
    """Median-of-rounds speedup of ``name`` over the reference in an interleaved section."""
    return section.get('speedup_vs_reference', {}).get(name, {}).get('median_of_rounds')


def headline(res):
    """The issue's figures from the latest run of each section."""
    out = {}
    dec = res.get('decode', {})
    for label in ('decode_at_context', 'decode_short', 'prefill'):
        sec = dec.get(label, {})
        for name in sec.get('contenders', {}):
            r = _ratio(sec, name)
            if r is not None:
                out[f'{label}: {name} over llama.cpp'] = r
        steps = dec.get('decode_steps_per_call', 1) if label != 'prefill' else None
        for name, c in sec.get('contenders', {}).items():
            if steps:
                out[f'{label}: {name} tok/s (median)'] = steps * 1e3 / c['median_ms']
            else:
                out[f'{label}: {name} tok/s (median)'] = dec['context'] * 1e3 / c['median_ms']
    vis = res.get('vision', {})
    for name, t in vis.get('ms_per_tile', {}).items():
        out[f'vision {name}: s per tile (median)'] = t['median'] / 1e3
    for prec, cos in vis.get('cosine_vs_fp32', {}).items():
        out[f'vision {prec}: min cosine to FP32'] = cos
    for d, p in res.get('pipeline', {}).items():
        if 'peak_rss_mb' in p:
            out[f'pipeline {d}: peak RSS MiB'] = p['peak_rss_mb']
            out[f'pipeline {d}: TTFT eager, 32-token question, ms (median)'] = (
                p['ttft_eager_ms']['median'])
            out[f'pipeline {d}: new frame TTFT ms'] = p['new_frame']['ttft_ms']
    return out


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dec, vis, pipe = res.get('decode', {}), res.get('vision', {}), res.get('pipeline', {})
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    labels = [k for k in ('decode_at_context', 'decode_short', 'prefill') if k in dec]
    names = []
    for k in labels:
        names += [n for n in dec[k]['contenders'] if n not in names]
    w = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        med, mn = [], []
        for k in labels:
            c = dec[k]['contenders'].get(name)
            tokens = dec['context'] if k == 'prefill' else dec['decode_steps_per_call']
            med.append(tokens * 1e3 / c['median_ms'] if c else np.nan)
            mn.append(tokens * 1e3 / c['min_ms'] if c else np.nan)
        x = np.arange(len(labels)) + (i - (len(names) - 1) / 2) * w
        ax[0].bar(x, med, w, label=name)
        ax[0].plot(x, mn, 'k.', markersize=4)
    ax[0].set_xticks(np.arange(len(labels)), [f'{k}' for k in labels], fontsize=8)
    ax[0].set_ylabel('tokens/s (bar: median, dot: best)')
    ax[0].set_title(f'LLM, interleaved, context {dec.get("context")}')
    ax[0].legend(fontsize=7)
    tiles = vis.get('ms_per_tile', {})
    ax[1].bar(list(tiles), [t['median'] / 1e3 for t in tiles.values()])
    ax[1].plot(list(tiles), [t['min'] / 1e3 for t in tiles.values()], 'k.')
    ax[1].axhline(2.5, color='r', ls='--', label='2.5 s target')
    ax[1].set_ylabel('s per 384x384 tile')
    ax[1].set_title('vision tower, interleaved')
    ax[1].tick_params(axis='x', labelsize=7, labelrotation=15)
    ax[1].legend(fontsize=7)
    rss = {d: p['peak_rss_mb'] for d, p in pipe.items() if 'peak_rss_mb' in p}
    ax[2].bar(list(rss), list(rss.values()))
    ax[2].axhline(2048, color='r', ls='--', label='2.0 GB target')
    ax[2].set_ylabel('peak RSS (MiB)')
    ax[2].set_title('pipeline: INT8 ViT + INT4 LLM + KV')
    ax[2].tick_params(axis='x', labelsize=7, labelrotation=15)
    ax[2].legend(fontsize=7)
    ttft = {d: (p['ttft_eager_ms']['median'] / 1e3, p['new_frame']['ttft_ms'] / 1e3)
            for d, p in pipe.items() if 'ttft_eager_ms' in p}
    x = np.arange(len(ttft))
    ax[3].bar(x - 0.2, [v[0] for v in ttft.values()], 0.4, label='frame encoded eagerly')
    ax[3].bar(x + 0.2, [v[1] for v in ttft.values()], 0.4, label='new frame (encode+prefill)')
    ax[3].set_yscale('log')
    ax[3].set_xticks(x, list(ttft), fontsize=7, rotation=15)
    ax[3].set_ylabel('time to first token (s)')
    ax[3].set_title('answer latency')
    ax[3].legend(fontsize=7)
    load = ', '.join(f'{x:.2f}' for x in res.get('load_average_start', ()))
    fig.suptitle(f'BlueLM-V-3B shapes, random weights, {res["threads"]} threads, '
                 f'load average at start {load}')
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--bundle', default=DEFAULT_BUNDLE)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--context', type=int, default=2048)
    ap.add_argument('--decode-tokens', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--decoders', default='int4-b128-kv8,int4-b128-gqa16,int4-b128-gqa32',
                    help='decoders of the bundle in the decode comparison')
    ap.add_argument('--prefill-decoders', default='int4-b128-kv8,int4-b128-gqa16',
                    help='decoders in the (slow: ~40 s a call) prefill comparison')
    ap.add_argument('--pipeline-decoders', default='int4-b128-kv8,int4-b128-gqa16,'
                    'int4-b128-gqa16+tiles1,int4-b128-gqa16+tiles1+low_memory',
                    help='decoders, +tiles1: vision batches of 1 tile, +low_memory: glibc '
                    'returns freed buffers at once (slower prefill)')
    ap.add_argument('--vision', default='int8:4,int8-fused:4,int8-fused:2,int8-fused:1',
                    help='vision graph:tile batch contenders (the first is the reference)')
    ap.add_argument('--pipeline-vision', default='int8-fused')
    ap.add_argument('--gguf', default=DEFAULT_GGUF)
    ap.add_argument('--only', default='vision,decode,pipeline',
                    help='sections to (re)run (also: genai); the others are kept from '
                    'an existing vlm.json')
    ap.add_argument('--genai-layers', type=int, default=4)
    ap.add_argument('--child', help=argparse.SUPPRESS)
    ap.add_argument('--kw', default='{}', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.kw = json.loads(args.kw)
    if args.child:
        fn = {'vision': run_vision, 'decode': run_decode, 'pipeline': run_pipeline,
              'genai': run_genai, 'slice': run_slice}
        print(json.dumps(fn[args.child](args)))
        return 0

    from bluelm_ros.runtime.vlm.bundle import Bundle
    only = set(args.only.split(','))
    b = Bundle(args.bundle, verify='size')
    res = {}
    old = os.path.join(os.path.dirname(plot_path('vlm')), 'vlm.json')
    if os.path.exists(old):
        with open(old) as f:
            res = json.load(f)
        if res.get('format') != 'harness':  # results of the pre-harness script
            res = {}
    res.update({'format': 'harness', 'machine': machine(), 'threads': args.threads,
                'context': args.context, 'decode_tokens': args.decode_tokens,
                'model': b.manifest['model'], 'load_average_start': os.getloadavg(),
                'weights': 'random (shapes of configs/bluelm-v-3b.json; LLM shape assumed)',
                'file_sizes_mb': {k: round(v, 1) for k, v in b.describe().items()}})
    decoders = [d for d in args.decoders.split(',') if d]
    res['decoders'] = {d: b.entry('decoder', d) for d in decoders}
    if 'vision' in only:
        pairs = [c.split(':') for c in args.vision.split(',')]
        res['vision'] = child(args, 'vision', precisions=sorted({p for p, _ in pairs}),
                              contenders=[(p, int(bs)) for p, bs in pairs])
    if 'decode' in only:
        llama = _ensure_gguf(args, b)
        res['decode'] = child(args, 'decode', decoders=decoders, llama=llama,
                              prefill_decoders=args.prefill_decoders.split(','))
        if llama:
            import llama_cpp
            res['decode']['llama_cpp'] = {'version': llama_cpp.__version__, 'kv_cache': 'f16',
                                          'gguf_mb': os.path.getsize(args.gguf) / 2 ** 20}
    if 'pipeline' in only:
        res['pipeline'] = {
            d: child(args, 'pipeline', decoder=d.split('+')[0], vision=args.pipeline_vision,
                     low_memory='+low_memory' in d,
                     tile_batch_size=1 if '+tiles1' in d else None)
            for d in args.pipeline_decoders.split(',')}
    if 'genai' in only:
        try:
            import onnxruntime_genai as og
            root = os.path.join(CACHE, f'genai-slice-{args.genai_layers}')
            og_dir, ours = prepare_genai_slice(b.manifest['model'], args.genai_layers, root)
            res['genai_vs_ours'] = {
                'layers': args.genai_layers, 'onnxruntime_genai': og.__version__,
                'genai': child(args, 'genai', dir=og_dir, chunks=[128]),
                'ours': child(args, 'slice', dir=ours, chunks=[128])}
        except ImportError as e:
            res['genai_vs_ours'] = {'error': f'onnxruntime_genai not importable: {e}'}
    res['load_average_end'] = os.getloadavg()
    res['headline'] = headline(res)
    save('vlm', res)
    plot(res, plot_path('vlm'))
    print(json.dumps(res['headline'], indent=1))
    return 0


def _ensure_gguf(args, b):
    """Make the same-shape random GGUF once; False when llama_cpp is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print('llama_cpp not importable: decode/prefill without llama.cpp', file=sys.stderr)
        return False
    if not os.path.exists(args.gguf):
        os.makedirs(os.path.dirname(args.gguf), exist_ok=True)
        make_random_gguf(b.manifest['model'], args.gguf)
    return True


if __name__ == '__main__':
    sys.exit(main())

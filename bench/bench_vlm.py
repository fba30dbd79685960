"""BlueLM-V runtime benchmark: full 3B config, random weights, ONNX Runtime vs llama.cpp.

Measures, with ``--threads`` (default 2) intra-op threads:

* bundle file sizes (vision FP32/INT8, decoder INT4, embeddings);
* vision ms per tile, INT8 vs FP32 (batches of 4 tiles);
* prefill tokens/s of a 2048-token prompt for several chunk sizes;
* decode tokens/s at 2048 tokens of context (and at a short context);
* time to first token with and without a pre-encoded image;
* peak RSS of the deployment pipeline (INT8 ViT released after encoding, INT4 LLM,
  KV cache of 2048 + decode tokens), each scenario in a fresh process;
* the same prefill/decode numbers for llama.cpp (llama-cpp-python) on a same-shape random
  LLaMA GGUF at Q4_0 (lm_head Q8_0), if llama_cpp is importable.

Make the bundle first (random weights, ~20 min on 2 busy cores; nothing is downloaded)::

    python -m bluelm_ros.tools.vlm.export --random bluelm-v-3b ~/.cache/bluelm_ros/bundles/\
bluelm-v-3b-random --vision fp32,int8 --decoder int4 --embed-dtype float16

Then ``python bench/bench_vlm.py``. Results: ``bench/results/vlm.json`` and ``vlm.png``.
Model files stay under ``~/.cache/bluelm_ros``.
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


def rss_mb():
    """Current resident set size (MiB)."""
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def child(args, mode, **kw):
    """Run one scenario in a fresh interpreter (clean peak RSS); return its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), '--child', mode,
           '--bundle', args.bundle, '--threads', str(args.threads),
           '--context', str(args.context), '--decode-tokens', str(args.decode_tokens),
           '--gguf', args.gguf, '--kw', json.dumps(kw)]
    env = dict(os.environ)
    # ORT runs with spinning off (the cores are shared); give llama.cpp's OpenMP threads
    # the same passive wait, which on busy cores was 4x faster for it here
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        return {'error': (r.stderr or r.stdout)[-500:]}
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


def _random_image_embedding(engine, grid=(2, 4)):
    from bluelm_ros.runtime.vlm.dynamic_resolution import num_tiles
    from bluelm_ros.runtime.vlm.image_encoder import ImageEmbedding
    cfg = engine.config
    n = num_tiles(grid) * cfg.tokens_per_tile
    emb = np.random.default_rng(0).normal(0, 0.02, (n, cfg.text.hidden_size)).astype(np.float32)
    return ImageEmbedding(key='random', embeds=emb, grid=grid, num_tiles=num_tiles(grid),
                          image_size=(384 * grid[0], 384 * grid[1]), encode_ms=0.0)


def run_vision(args, precision):
    """Per-tile latency of one vision precision (batches of 4 tiles)."""
    from bluelm_ros.runtime.ort_session import create_session
    from bluelm_ros.runtime.vlm.bundle import Bundle
    b = Bundle(args.bundle, verify='size')
    t = time.perf_counter()
    sess, _ = create_session(b.component_files('vision', precision)[0], threads=args.threads)
    load_ms = (time.perf_counter() - t) * 1e3
    s = b.config.vision.image_size
    tiles = np.random.default_rng(0).uniform(-1, 1, (4, 3, s, s)).astype(np.float32)
    sess.run(None, {'pixel_values': tiles[:1]})  # warm-up
    times = []
    for _ in range(args.kw.get('repeat', 1)):
        t = time.perf_counter()
        sess.run(None, {'pixel_values': tiles})
        times.append((time.perf_counter() - t) * 1e3 / 4)
    return {'precision': precision, 'ms_per_tile': float(np.median(times)),
            'load_ms': load_ms, 'peak_rss_mb': peak_rss_mb()}


def run_prefill_decode(args):
    """Prefill tok/s per chunk size at ``context`` tokens, then decode tok/s."""
    eng = _engine(args)
    t = time.perf_counter()
    eng.load(vision=False)
    out = {'decoder_load_ms': (time.perf_counter() - t) * 1e3, 'prefill': {}}
    emb = _random_image_embedding(eng)
    ids, _ = _prompt_ids(eng, emb, args.context)
    for chunk in args.kw['chunks']:
        r = eng.generate_ids(ids, emb, max_new_tokens=1, stop_token_ids=[],
                             prefill_chunk=chunk, reuse_prefix=False)
        out['prefill'][str(chunk)] = {'ms': r.timings.prefill_ms,
                                      'tokens_per_second': r.timings.prefill_tokens_per_second}
    # decode at full context (prompt prefilled with chunk 128 above is reused)
    r = eng.generate_ids(ids, emb, max_new_tokens=args.decode_tokens, stop_token_ids=[],
                         prefill_chunk=128, reuse_prefix=False)
    out['ttft_preencoded_ms'] = r.timings.time_to_first_token_ms
    out['decode_tokens_per_second_at_context'] = r.timings.tokens_per_second
    out['decode_ms_per_token_at_context'] = 1e3 / r.timings.tokens_per_second
    short = _prompt_ids(eng, None, 128)[0]
    r = eng.generate_ids(short, None, max_new_tokens=args.decode_tokens, stop_token_ids=[],
                         reuse_prefix=False)
    out['decode_tokens_per_second_short'] = r.timings.tokens_per_second
    out['short_prompt_tokens'] = len(short)
    out['peak_rss_mb'] = peak_rss_mb()
    return out


def run_pipeline(args):
    """Deployment flow in one process: peak RSS and TTFT without a pre-encoded image.

    INT8 ViT encodes a 768x1536 frame (2:4 grid, 9 tiles, released afterwards), then the
    INT4 LLM answers a 2048-token prompt and decodes ``decode_tokens``.
    """
    eng = _engine(args, release_vision=True, low_memory=args.kw.get('low_memory', False))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1536, 768, 3), dtype=np.uint8)
    phases = {'start': rss_mb()}
    emb = eng.encode_image(image, key='probe')  # only to size the prompt
    eng.images.clear()
    phases['after_vision'] = rss_mb()
    ids_len = args.context
    _, question = _prompt_ids(eng, emb, ids_len)
    res = eng.generate(question, image=image, max_new_tokens=args.decode_tokens,
                       stop_token_ids=[])
    phases['after_generate'] = rss_mb()
    tm = res.timings
    return {'peak_rss_mb': peak_rss_mb(), 'rss_phases_mb': phases, 'image_tiles': tm.image_tiles,
            'image_tokens': tm.image_tokens, 'prompt_tokens': tm.prompt_tokens,
            'image_encode_ms': tm.image_encode_ms, 'prefill_ms': tm.prefill_ms,
            'ttft_with_image_encode_ms': tm.time_to_first_token_ms,
            'decode_tokens_per_second': tm.tokens_per_second,
            'kv_slots': eng.decoder.capacity}


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


def run_llama(args):
    """Prefill tok/s per batch size and decode tok/s with llama-cpp-python.

    One ``Llama`` at a time (each repacks the Q4_0 weights), so the peak RSS is that of a
    single model with a ``context + decode_tokens`` KV cache (f16, llama.cpp's default).
    """
    import gc
    from llama_cpp import Llama
    ctx = args.context + args.decode_tokens
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 30000, args.context - 1).tolist()
    out = {'prefill': {}}

    def load(chunk):
        return Llama(args.gguf, n_ctx=ctx, n_batch=chunk, n_ubatch=chunk,
                     n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def decode(llm, tok):
        t = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            llm.eval([tok])
            tok = _llama_argmax(llm)
        return (args.decode_tokens - 1) / (time.perf_counter() - t)

    for chunk in args.kw['chunks']:
        llm = load(chunk)
        t = time.perf_counter()
        llm.eval(ids)
        ms = (time.perf_counter() - t) * 1e3
        out['prefill'][str(chunk)] = {'ms': ms, 'tokens_per_second': len(ids) / ms * 1e3}
        if chunk == 128:
            # decode at full context after the chunk-128 prefill (greedy, as our engine)
            out['decode_tokens_per_second_at_context'] = decode(llm, _llama_argmax(llm))
        del llm
        gc.collect()
    llm = load(128)
    llm.eval(ids[:128])
    out['decode_tokens_per_second_short'] = decode(llm, _llama_argmax(llm))
    out['peak_rss_mb'] = peak_rss_mb()
    out['gguf_mb'] = os.path.getsize(args.gguf) / 2 ** 20
    out['kv_cache'] = 'f16'
    return out


def run_same_window(args):
    """ORT decoders and llama.cpp loaded in one process and measured alternately.

    On shared cores the load changes from minute to minute; interleaving the engines puts
    them under the same conditions (the per-section numbers above are not).
    """
    from llama_cpp import Llama
    ctx = args.context + args.decode_tokens
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 250, args.context - 1).tolist()
    engines = {d: _engine(argparse.Namespace(**{**vars(args), 'kw': {'decoder': d}}))
               for d in args.kw['decoders']}
    for e in engines.values():
        e.load(vision=False)
    llm = Llama(args.gguf, n_ctx=ctx, n_batch=128, n_ubatch=128, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    out = {name: {'prefill_tps': [], 'decode_tps_at_context': [], 'decode_tps_short': []}
           for name in list(engines) + ['llama.cpp']}
    n = args.kw.get('decode', 16)

    def llama_run(prompt, decode):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pre = len(prompt) / (time.perf_counter() - t)
        tok = _llama_argmax(llm)
        t = time.perf_counter()
        for _ in range(decode):
            llm.eval([tok])
            tok = _llama_argmax(llm)
        return pre, decode / (time.perf_counter() - t)

    for rnd in range(args.kw.get('rounds', 2)):
        for name in list(engines) + ['llama.cpp']:
            for prompt, key in ((ids, 'decode_tps_at_context'), (ids[:128], 'decode_tps_short')):
                if name == 'llama.cpp':
                    pre, dec = llama_run(prompt, n)
                else:
                    r = engines[name].generate_ids(prompt, None, max_new_tokens=n + 1,
                                                   stop_token_ids=[], prefill_chunk=128,
                                                   reuse_prefix=False)
                    pre, dec = r.timings.prefill_tokens_per_second, r.timings.tokens_per_second
                if prompt is ids:
                    out[name]['prefill_tps'].append(pre)
                out[name][key].append(dec)
    return {name: {k: float(np.median(v)) for k, v in m.items()} | {'runs': m}
            for name, m in out.items()}


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


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 5, figsize=(23, 4))
    series = {f'ORT {d}': o for d, o in res.get('ort', {}).items() if 'prefill' in o}
    if 'prefill' in res.get('llama_cpp', {}):
        series['llama.cpp Q4_0'] = res['llama_cpp']
    chunks = sorted({c for o in series.values() for c in o['prefill']}, key=int)
    x = np.arange(len(chunks))
    w = 0.8 / max(1, len(series))
    for k, (name, o) in enumerate(series.items()):
        ax[0].bar(x + k * w, [o['prefill'].get(c, {}).get('tokens_per_second', 0)
                              for c in chunks], w, label=name)
    ax[0].set_xticks(x + 0.4 - w / 2, chunks)
    ax[0].set_xlabel('prefill chunk (tokens)')
    ax[0].set_ylabel('tokens/s')
    ax[0].set_title(f'prefill, {res["context"]}-token prompt')
    ax[0].legend(fontsize=7)
    names = list(series)
    for j, key in enumerate(('decode_tokens_per_second_at_context',
                             'decode_tokens_per_second_short')):
        ax[1].bar(np.arange(len(names)) + j * 0.4, [series[n].get(key, 0) for n in names], 0.4,
                  label='at context' if j == 0 else 'short prompt')
    ax[1].set_xticks(np.arange(len(names)) + 0.2, names, fontsize=7)
    ax[1].set_ylabel('tokens/s')
    ax[1].set_title('decode')
    ax[1].legend(fontsize=7)
    v = res.get('vision', {})
    labels = [p for p in ('fp32', 'int8') if 'ms_per_tile' in v.get(p, {})]
    ax[2].bar(labels, [v[p]['ms_per_tile'] for p in labels])
    ax[2].set_ylabel('ms per 384x384 tile')
    ax[2].set_title('vision (SigLIP-400M + projector)')
    pipe = {d: p['peak_rss_mb'] for d, p in res.get('pipeline', {}).items() if 'peak_rss_mb' in p}
    if 'peak_rss_mb' in res.get('llama_cpp', {}):
        pipe['llama.cpp (LLM only)'] = res['llama_cpp']['peak_rss_mb']
    ax[3].bar(list(pipe), list(pipe.values()))
    ax[3].axhline(2048, color='r', ls='--', label='2.0 GB target')
    ax[3].set_ylabel('peak RSS (MiB)')
    ax[3].set_title('memory, ViT + LLM + KV')
    ax[3].tick_params(axis='x', labelsize=7, labelrotation=15)
    ax[3].legend(fontsize=7)
    sw = res.get('same_window', {})
    if sw and 'error' not in sw:
        keys = ('prefill_tps', 'decode_tps_at_context', 'decode_tps_short')
        x = np.arange(len(keys))
        w = 0.8 / len(sw)
        for k, (name, m) in enumerate(sw.items()):
            ax[4].bar(x + k * w, [m[q] for q in keys], w, label=name)
        ax[4].set_xticks(x + 0.4 - w / 2, ['prefill (chunk 128)', 'decode @ctx', 'decode short'],
                         fontsize=7)
        ax[4].set_ylabel('tokens/s')
        ax[4].set_title('same window (engines interleaved)')
        ax[4].legend(fontsize=7)
    fig.suptitle(f'BlueLM-V-3B shape, random weights, {res["threads"]} threads '
                 f'(shared 2-core VM: absolute numbers are noisy)')
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--bundle', default=DEFAULT_BUNDLE)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--context', type=int, default=2048)
    ap.add_argument('--decode-tokens', type=int, default=32)
    ap.add_argument('--chunks', default='32,128,512')
    ap.add_argument('--decoders', default='',
                    help='decoder keys of the bundle to measure (default: all INT4 ones)')
    ap.add_argument('--gguf', default=DEFAULT_GGUF)
    ap.add_argument('--only', default='vision,ort,pipeline,llama,genai,same_window',
                    help='sections to (re)run; the others are kept from an existing vlm.json')
    ap.add_argument('--genai-layers', type=int, default=4)
    ap.add_argument('--child', help=argparse.SUPPRESS)
    ap.add_argument('--kw', default='{}', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.kw = json.loads(args.kw)
    if args.child:
        fn = {'vision': lambda: run_vision(args, args.kw['precision']),
              'prefill': lambda: run_prefill_decode(args),
              'pipeline': lambda: run_pipeline(args), 'llama': lambda: run_llama(args),
              'genai': lambda: run_genai(args), 'slice': lambda: run_slice(args),
              'same_window': lambda: run_same_window(args)}
        print(json.dumps(fn[args.child]()))
        return 0

    from bluelm_ros.runtime.vlm.bundle import Bundle
    only = set(args.only.split(','))
    chunks = [int(c) for c in args.chunks.split(',')]
    b = Bundle(args.bundle, verify='size')
    decoders = ([d for d in args.decoders.split(',') if d]
                or [d for d in b.precisions('decoder') if d.startswith('int4')])
    res = {}
    old = os.path.join(os.path.dirname(plot_path('vlm')), 'vlm.json')
    if os.path.exists(old):
        with open(old) as f:
            res = json.load(f)
    res.update({'machine': machine(), 'threads': args.threads, 'context': args.context,
                'decode_tokens': args.decode_tokens, 'model': b.manifest['model'],
                'weights': 'random (shapes of configs/bluelm-v-3b.json; LLM shape assumed)',
                'file_sizes_mb': {k: round(v, 1) for k, v in b.describe().items()}})
    res.setdefault('decoders', {}).update({d: b.entry('decoder', d) for d in decoders})
    if 'vision' in only:
        res['vision'] = {p: child(args, 'vision', precision=p) for p in b.precisions('vision')}
        if {'fp32', 'int8'} <= set(res['vision']):
            res['vision']['int8_speedup'] = (res['vision']['fp32']['ms_per_tile']
                                             / res['vision']['int8']['ms_per_tile'])
    if 'ort' in only:
        res.setdefault('ort', {}).update(
            {d: child(args, 'prefill', chunks=chunks, decoder=d) for d in decoders})
    if 'pipeline' in only:
        res.setdefault('pipeline', {}).update(
            {d: child(args, 'pipeline', decoder=d) for d in decoders})
        for d in decoders:
            if '-kv8' in d:  # the memory-optimised variant, also with low_memory=True
                res['pipeline'][f'{d}+low_memory'] = child(args, 'pipeline', decoder=d,
                                                           low_memory=True)
    if 'llama' in only:
        try:
            import llama_cpp
            if not os.path.exists(args.gguf):
                os.makedirs(os.path.dirname(args.gguf), exist_ok=True)
                make_random_gguf(b.manifest['model'], args.gguf)
            res['llama_cpp'] = child(args, 'llama', chunks=chunks)
            res['llama_cpp']['version'] = llama_cpp.__version__
        except ImportError as e:
            res['llama_cpp'] = {'error': f'llama_cpp not importable: {e}'}
    if 'same_window' in only:
        res['same_window'] = child(args, 'same_window', decoders=decoders, rounds=1,
                                   decode=16)
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
    res['ratios'] = ratios(res)
    save('vlm', res)
    plot(res, plot_path('vlm'))
    print(json.dumps(res, indent=1))
    return 0


def ratios(res):
    """Headline ratios (ORT over llama.cpp, memory over target, TTFT)."""
    out = {}
    ll = res.get('llama_cpp', {})
    for d, o in res.get('ort', {}).items():
        if 'prefill' in ll and 'prefill' in o:
            for c in o['prefill']:
                if c in ll['prefill']:
                    out[f'{d}_prefill_chunk{c}_over_llama_cpp'] = (
                        o['prefill'][c]['tokens_per_second']
                        / ll['prefill'][c]['tokens_per_second'])
            for k in ('decode_tokens_per_second_at_context', 'decode_tokens_per_second_short'):
                out[f'{d}_{k}_over_llama_cpp'] = o[k] / ll[k]
        p = res.get('pipeline', {}).get(d, {})
        if 'ttft_with_image_encode_ms' in p and 'ttft_preencoded_ms' in o:
            out[f'{d}_ttft_without_over_with_preencoded_image'] = (
                p['ttft_with_image_encode_ms'] / o['ttft_preencoded_ms'])
    for d, p in res.get('pipeline', {}).items():
        if 'peak_rss_mb' in p:
            out[f'{d}_peak_rss_over_2GB_target'] = p['peak_rss_mb'] / 2048
    sw = res.get('same_window', {})
    for d in res.get('ort', {}):
        if d in sw and 'llama.cpp' in sw:
            for k in ('prefill_tps', 'decode_tps_at_context', 'decode_tps_short'):
                out[f'same_window_{d}_{k}_over_llama_cpp'] = sw[d][k] / sw['llama.cpp'][k]
    g = res.get('genai_vs_ours', {})
    if 'prefill' in g.get('genai', {}) and 'prefill' in g.get('ours', {}):
        out['slice_prefill128_ours_over_genai'] = (
            g['ours']['prefill']['128']['tokens_per_second']
            / g['genai']['prefill']['128']['tokens_per_second'])
        out['slice_decode_at_context_ours_over_genai'] = (
            g['ours']['decode_tokens_per_second_at_context']
            / g['genai']['decode_tokens_per_second_at_context'])
    return out


if __name__ == '__main__':
    sys.exit(main())

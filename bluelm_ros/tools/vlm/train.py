r"""Train the scene-QA BlueLM-V model from scratch (torch): ``bluelm-ros vlm-train``.

Data: :mod:`bluelm_ros.data.scene_qa` renders street scenes on the fly in DataLoader
workers; each training item is one scene with several questions (one per question type
and a few extra), so a render feeds several sequences and the ViT encodes it once per
step. Every sequence is the chat prompt ``[BOS] [|Human|]: <image tokens> \n question
[|AI|]:`` followed by ``answer </s>``; the loss is the cross-entropy on the answer tokens
and EOS only.

Model: ``configs/scene-tiny.json`` (the BlueLM-V layout at toy size); tokenizer: a
byte-level BPE trained here with HF ``tokenizers`` on every text the generator can
produce plus the chat-template special tokens (``tokenizer.json`` in the output folder).

Optimisation: AdamW, linear warmup then cosine decay. The schedule runs on "progress",
``max(step / steps, train_seconds / time_limit)``, so a ``--time-limit`` run decays the
learning rate fully by the deadline whatever the machine's speed (use ``--steps`` alone
for step-exact reproducibility). bf16 autocast on CUDA, fp32 on CPU. Checkpoints
(``checkpoint.pt``) every ``--ckpt-every`` seconds and at the end; ``--resume`` continues
a run (same data order: item i of step s is scene seed ``base + s * batch + i``).

Evaluation: greedy decoding (batched, left-padded; ``--eval-mode single`` uses
:meth:`BlueLMV.generate_greedy` one sample at a time) on the held-out seeds of
``scene_qa_data``, exact match per question type, in fp32. Output folder: ``config.json``
+ ``model.safetensors`` (``BlueLMV.save_pretrained``), ``tokenizer.json``, ``eval.json``,
``train_log.jsonl``, ``checkpoint.pt``.

``--dry-run`` trains a few CPU steps with small batches and evaluates a handful of
samples, to check the pipeline in well under a minute.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bluelm_ros.data import scene_qa as sqa
from bluelm_ros.runtime.vlm.config import BlueLMVConfig
from bluelm_ros.tools.vlm.configs import count_parameters, load_config
from bluelm_ros.runtime.vlm.dynamic_resolution import DynamicResolution, fit_size
from bluelm_ros.tools.vlm.modeling import BlueLMV, describe
from bluelm_ros.runtime.vlm.tokenizer import TOKENIZER_FILE, VLMTokenizer

SPECIAL_TOKENS = ('<pad>', '<s>', '</s>', '<image>', '[|Human|]:', '[|AI|]:')
CHECKPOINT = 'checkpoint.pt'
EVAL_FILE = 'eval.json'
LOG_FILE = 'train_log.jsonl'
IGNORE = -100
QTYPE_INDEX = {t: i for i, t in enumerate(sqa.QTYPES)}
# Questions asked per training scene: every type twice (duplicates are dropped). They
# share one sequence: the image prefix once, then one block per question (see
# collate_train), so extra questions cost only their few text tokens.
TRAIN_QTYPES = sqa.QTYPES * 2
# --questions focus: two more tries at the types a small model learns last (shirt colours,
# "which is closer"); a question costs ~17 decoder tokens next to a ~190-token prefix.
FOCUS_QTYPES = TRAIN_QTYPES + ('color', 'position')
QUESTION_SETS = {'types': sqa.QTYPES, 'extra': TRAIN_QTYPES, 'focus': FOCUS_QTYPES}
CURVE_FILE = 'learning_curve.json'
# Auxiliary dense targets for the vision tower (training only): per-patch class
# fractions of the segmentation mask and of the object colours.
SEM_IDS = tuple(sorted(sqa.REGION_NAMES))
SEM_LUT = np.full(256, len(SEM_IDS), np.uint8)
SEM_LUT[list(SEM_IDS)] = np.arange(len(SEM_IDS))
N_SEM, N_COLOR = len(SEM_IDS), len(sqa.COLORS) + 1
# Training renders at 0.3..1 x the nominal size (never below 144 px on the short side):
# the tiler keeps about 300 x 150 pixels anyway, and small renders are fast.
TRAIN_SCALE = (0.3, 1.0)
MIN_SIDE = 144
DATA_SEED_STRIDE = 100_000_000  # --seed k trains on scene seeds [k * stride, ...)


# ---------------------------------------------------------------------------
# tokenizer


def tokenizer_corpus(config: BlueLMVConfig) -> list:
    """Training text for the tokenizer: every generator text, alone and in the template."""
    texts = sqa.corpus()
    tpl = config.prompt.template.replace('{image}', '')
    return [tpl.replace('{question}', t) for t in texts] + texts


def train_tokenizer(path: str, config: BlueLMVConfig) -> VLMTokenizer:
    """Train a byte-level BPE (any text encodes; exact round trip) and save it to ``path``.

    The special tokens get ids 0..5 in :data:`SPECIAL_TOKENS` order, which must agree
    with the config's pad / bos / eos / image token ids. Deterministic for a config.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.text.vocab_size, min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(config), trainer)
    expect = {'<pad>': config.pad_token_id, '<s>': config.bos_token_id,
              '</s>': config.eos_token_ids[0], '<image>': config.image_token_id}
    for name, want in expect.items():
        got = tok.token_to_id(name)
        if got != want:
            raise ValueError(f'{config.name}: tokenizer id of {name} is {got}, config says '
                             f'{want}')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return VLMTokenizer(path, config)


# ---------------------------------------------------------------------------
# data


def _worker_init(_):
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def patch_targets(label: np.ndarray, tiled, tile: int, patch: int, n_cls: int) -> np.ndarray:
    """Per-patch class fractions ``[n_tiles, g*g, n_cls]`` of a label map, tiled like the image.

    Follows the tiler's geometry (content box on the grid canvas, centred thumbnail);
    padding counts for no class, so a patch's fractions sum to its share of image pixels.
    """
    h0, w0 = label.shape
    m, n = tiled.grid
    x0, y0, w, h = tiled.content_box
    canvas = np.full((n * tile, m * tile), n_cls, np.uint8)
    canvas[y0:y0 + h, x0:x0 + w] = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    tiles = canvas.reshape(n, tile, m, tile).transpose(0, 2, 1, 3).reshape(n * m, tile, tile)
    if tiled.has_thumbnail:
        tw, th = fit_size(w0, h0, tile, tile)
        thumb = np.full((tile, tile), n_cls, np.uint8)
        ox, oy = (tile - tw) // 2, (tile - th) // 2
        thumb[oy:oy + th, ox:ox + tw] = cv2.resize(label, (tw, th),
                                                   interpolation=cv2.INTER_NEAREST)
        tiles = np.concatenate([tiles, thumb[None]])
    g = tile // patch
    k = tiles.shape[0] * g * g
    t = tiles[:, :g * patch, :g * patch].reshape(-1, g, patch, g, patch)
    t = t.transpose(0, 1, 3, 2, 4).reshape(k, patch * patch).astype(np.int64)
    idx = np.arange(k)[:, None] * (n_cls + 1) + t
    counts = np.bincount(idx.ravel(), minlength=k * (n_cls + 1)).reshape(k, n_cls + 1)
    frac = counts[:, :n_cls].astype(np.float32) / (patch * patch)
    return frac.reshape(tiles.shape[0], g * g, n_cls)


class SceneQATrainSet(Dataset):
    """Item i: scene seed ``start + i`` (and its mirror image), tiled, with questions.

    Returns a list of scene records (two with ``flip``): tiles (float16), image token
    count, prompt prefix ids (BOS .. image tokens), per question ``(qtype, suffix ids,
    answer ids + EOS)``, and the auxiliary patch targets.
    """

    def __init__(self, tokenizer: VLMTokenizer, config: BlueLMVConfig, start: int,
                 length: int, qtypes=TRAIN_QTYPES, scale_range=TRAIN_SCALE,
                 min_side: int = MIN_SIDE, flip: bool = True, aux: bool = True,
                 generator_kwargs: dict | None = None):
        if start + length > sqa.HELDOUT_SEED_BASE:
            raise ValueError('training seeds would reach the held-out range')
        self.tok, self.start, self.length = tokenizer, int(start), int(length)
        self.qtypes = tuple(qtypes)
        self.gen = sqa.SceneQAGenerator(scale_range=scale_range, min_side=min_side,
                                        **(generator_kwargs or {}))
        self.dr = DynamicResolution.from_config(config)
        self.eos = config.eos_token_ids[0]
        self.image_token_id = config.image_token_id
        self.flip, self.aux = flip, aux
        self.tile, self.patch = config.vision.image_size, config.vision.patch_size

    def __len__(self):
        return self.length

    def record(self, scene, qas) -> dict:
        """Tile and tokenize one scene with its questions."""
        tiled = self.dr(scene.image)
        prefix, blocks = None, []
        for qtype, question, answer in qas:
            ids = self.tok.build_prompt(question, tiled.num_tokens)
            cut = len(ids) - ids[::-1].index(self.image_token_id)
            if prefix is None:
                prefix = ids[:cut]
            elif ids[:cut] != prefix:
                raise ValueError('prompts of one image differ before the question')
            blocks.append((QTYPE_INDEX[qtype], ids[cut:], self.tok.encode(answer) + [self.eos]))
        rec = {'tiles': torch.from_numpy(tiled.tiles).to(torch.float16),
               'n_tok': tiled.num_tokens, 'prefix': prefix or [], 'blocks': blocks}
        if self.aux:
            sem = patch_targets(SEM_LUT[scene.mask], tiled, self.tile, self.patch, N_SEM)
            col = patch_targets(sqa.color_map(scene), tiled, self.tile, self.patch, N_COLOR)
            rec['aux'] = torch.from_numpy(np.concatenate([sem, col], -1)).to(torch.float16)
        return rec

    def __getitem__(self, i):
        seed = self.start + int(i)
        scene, clear = self.gen.clear_scene(seed)
        recs = [self.record(scene, self.gen.ask_many(scene, seed, self.qtypes, 0, clear))]
        if self.flip:
            mirror = sqa.flip_scene(scene)
            recs.append(self.record(mirror, self.gen.ask_many(mirror, seed, self.qtypes, 1,
                                                              clear)))
        return [r for r in recs if r['blocks']]


def collate_train(batch, pad_id: int = 0):
    """Pack each scene's questions into one sequence; right-pad; loss on answers only.

    A sequence is ``prefix (BOS, template, image tokens)`` then one block per question
    (newline, question, ``[|AI|]:``, answer, ``</s>``). ``block`` ids (0 prefix, j >= 1 question j,
    -1 padding) make :func:`packed_mask` let each block see the prefix and itself only,
    and every block's positions restart after the prefix, so each question is computed
    exactly as a separate single-question prompt. ``img_index`` maps the image
    placeholders (row-major) to rows of the flattened tile features.
    """
    recs = [r for item in batch for r in (item if isinstance(item, list) else [item])]
    tiles = torch.cat([r['tiles'] for r in recs])
    seqs, img_index, off = [], [], 0
    for r in recs:
        p = len(r['prefix'])
        ids, pos, blk, lab = list(r['prefix']), list(range(p)), [0] * p, [IGNORE] * p
        for j, (_, suffix, answer) in enumerate(r['blocks'], 1):
            ids += suffix + answer
            pos += list(range(p, p + len(suffix) + len(answer)))
            blk += [j] * (len(suffix) + len(answer))
            lab += [IGNORE] * len(suffix) + answer
        seqs.append((ids, pos, blk, lab))
        img_index.append(torch.arange(off, off + r['n_tok']))
        off += r['n_tok']
    length = max(len(x[0]) for x in seqs)
    n = len(seqs)
    out = {'input_ids': torch.full((n, length), pad_id, dtype=torch.long),
           'position_ids': torch.zeros((n, length), dtype=torch.long),
           'block': torch.full((n, length), -1, dtype=torch.long),
           'labels': torch.full((n, length), IGNORE, dtype=torch.long)}
    for i, seq in enumerate(seqs):
        for key, vals in zip(('input_ids', 'position_ids', 'block', 'labels'), seq):
            out[key][i, :len(vals)] = torch.tensor(vals)
    out['tiles'] = tiles
    out['img_index'] = torch.cat(img_index)
    out['qtype'] = torch.tensor([b[0] for r in recs for b in r['blocks']])
    if recs and 'aux' in recs[0]:
        out['aux'] = torch.cat([r['aux'] for r in recs])
    return out


def packed_mask(block: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, L, L]`` for packed question blocks.

    Query i may see key j <= i when j is in the prefix (block 0) or in i's own block;
    padding (block -1) is seen by nobody but itself (no all-masked rows).
    """
    length = block.shape[1]
    ar = torch.arange(length, device=block.device)
    causal = (ar[None, :] <= ar[:, None])[None]
    kb, qb = block[:, None, :], block[:, :, None]
    mask = causal & (kb >= 0) & ((kb == 0) | (kb == qb))
    return (mask | torch.eye(length, dtype=torch.bool, device=block.device)[None])[:, None]


class HeldoutSet(Dataset):
    """Held-out samples (nominal image sizes): tiles, prompt ids and the gold answer."""

    def __init__(self, tokenizer: VLMTokenizer, config: BlueLMVConfig, n_per_type: int,
                 base: int = sqa.HELDOUT_SEED_BASE, generator_kwargs: dict | None = None):
        self.tok = tokenizer
        self.items = sqa.heldout_seeds(n_per_type, base)
        self.gen = sqa.SceneQAGenerator(**(generator_kwargs or {}))
        self.dr = DynamicResolution.from_config(config)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        seed, qtype = self.items[i]
        s = self.gen.sample(seed, qtype)
        tiled = self.dr(s.image)
        return {'tiles': torch.from_numpy(tiled.tiles), 'n_tok': tiled.num_tokens,
                'prompt': self.tok.build_prompt(s.question, tiled.num_tokens),
                'question': s.question, 'answer': s.answer, 'qtype': qtype, 'seed': seed,
                'size': s.size, 'grid': tiled.grid}


def _collate_list(batch):
    return batch


# ---------------------------------------------------------------------------
# model helpers


class AuxHead(torch.nn.Module):
    """Training-only linear head on the ViT patch features: class + colour fractions.

    Not part of the saved model (``save_pretrained`` only writes :class:`BlueLMV`);
    it makes the vision tower learn what and where the scene's parts are quickly.
    """

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, N_SEM + N_COLOR)

    def forward(self, x):
        """``[N, patches, C]`` -> logits ``[N, patches, N_SEM + N_COLOR]``."""
        return self.proj(x)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class fractions, per patch normalised, padding-only skipped."""
    mass = target.sum(-1)
    keep = mass > 0
    logp = F.log_softmax(logits.float()[keep], -1)
    t = target.float()[keep] / mass[keep, None]
    return -(t * logp).sum(-1).mean()


def image_embeddings(model: BlueLMV, tiles: torch.Tensor, img_index: torch.Tensor,
                     aux_head: AuxHead | None = None) -> tuple:
    """Encode all tiles at once; gather one feature row per image placeholder.

    Returns ``(image embeddings, aux logits or None)``.
    """
    vt = model.vision_tower(tiles)
    x = vt if model.downsampler is None else model.downsampler(vt)
    feats = model.projector(x)
    aux = aux_head(vt) if aux_head is not None else None
    return feats.reshape(-1, feats.shape[-1])[img_index], aux


def batch_loss(model: BlueLMV, batch: dict, device, aux_head: AuxHead | None = None,
               aux_weight: float = 0.0) -> tuple:
    """``(loss, answer-token accuracy, aux loss)`` of a collated training batch."""
    def get(k):
        return batch[k].to(device, non_blocking=True)
    tiles = get('tiles').float()
    ids, labels = get('input_ids'), get('labels')
    use_aux = aux_head is not None and aux_weight > 0 and 'aux' in batch
    img, aux_logits = image_embeddings(model, tiles, get('img_index'),
                                       aux_head if use_aux else None)
    embeds = model.merge(ids, img)
    logits, _ = model.language_model(embeds, get('position_ids'), packed_mask(get('block')))
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE)
    aux_loss = torch.zeros((), device=loss.device)
    if use_aux:
        at = get('aux')
        aux_loss = (soft_ce(aux_logits[..., :N_SEM], at[..., :N_SEM])
                    + soft_ce(aux_logits[..., N_SEM:], at[..., N_SEM:]))
    with torch.no_grad():
        keep = target != IGNORE
        acc = (logits.argmax(-1)[keep] == target[keep]).float().mean()
    return loss + aux_weight * aux_loss, acc, aux_loss.detach()


@torch.no_grad()
def generate_batch(model: BlueLMV, prompts: list, tiles: list, max_new_tokens: int = 24,
                   device='cpu') -> list:
    """Greedy decoding of several prompts at once (left padding, KV cache).

    ``prompts``: token id lists (with their image placeholders); ``tiles``: one
    ``[n, 3, T, T]`` tensor per prompt. Returns the new ids per prompt, up to and
    including the first EOS. Matches :meth:`BlueLMV.generate_greedy` per sample.
    """
    cfg = model.config
    eos = set(cfg.eos_token_ids)
    pad = cfg.pad_token_id or 0
    b = len(prompts)
    length = max(len(p) for p in prompts)
    ids = torch.full((b, length), pad, dtype=torch.long)
    valid = torch.zeros((b, length), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = torch.tensor(p)
        valid[r, length - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    feats = model.encode_tiles(torch.cat(tiles).to(device).float())
    embeds = model.merge(ids, feats.reshape(-1, feats.shape[-1]))
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    # causal, no padded keys; a padded query sees itself only (no all-masked rows)
    q = torch.arange(length, device=device)
    causal = q[None, :] <= q[:, None]
    mask = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool,
                                                          device=device)[None]
    logits, past = model.language_model(embeds, pos, mask[:, None], None,
                                        last_logits_only=True)
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    last_pos = pos[:, -1]
    attn = valid.long()
    for step in range(max_new_tokens):
        tok = logits[:, -1].argmax(-1)
        for r in range(b):
            if not done[r]:
                out[r].append(int(tok[r]))
        done |= torch.tensor([t in eos for t in tok.tolist()], device=device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], 1)
        last_pos = last_pos + 1
        logits, past = model.language_model(model.embed_tokens(tok[:, None]),
                                            last_pos[:, None], attn, past)
    return out


def evaluate_model(model: BlueLMV, tok: VLMTokenizer, n_per_type: int, device='cpu',
                   workers: int = 0, batch_size: int = 128, mode: str = 'batched',
                   base: int = sqa.HELDOUT_SEED_BASE, generator_kwargs: dict | None = None,
                   max_new_tokens: int = 24, progress: bool = True) -> dict:
    """Exact-match accuracy per question type on the held-out seeds (fp32, greedy)."""
    model.eval()
    data = HeldoutSet(tok, model.config, n_per_type, base, generator_kwargs)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_list, worker_init_fn=_worker_init)
    types, preds, answers, records = [], [], [], []
    bar = tqdm(total=len(data), desc='eval', unit='q', disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for items in loader:
        if mode == 'single':
            gen = [model.generate_greedy(torch.tensor([it['prompt']], device=device),
                                         pixel_values=it['tiles'].to(device),
                                         max_new_tokens=max_new_tokens) for it in items]
        else:
            gen = generate_batch(model, [it['prompt'] for it in items],
                                 [it['tiles'] for it in items], max_new_tokens, device)
        for it, g in zip(items, gen):
            pred = tok.decode(g).strip()
            types.append(it['qtype'])
            preds.append(pred)
            answers.append(it['answer'])
            records.append({'seed': it['seed'], 'qtype': it['qtype'], 'size': it['size'],
                            'grid': list(it['grid']), 'question': it['question'],
                            'answer': it['answer'], 'prediction': pred})
        bar.update(len(items))
    bar.close()
    result = sqa.score(types, preds, answers)
    wrong = [r for r in records if not sqa.is_correct(r['prediction'], r['answer'])]
    result['errors'] = {t: [r for r in wrong if r['qtype'] == t][:8] for t in sqa.QTYPES}
    result['records'] = records
    return result


class TorchAnswerer:
    """``answer(image_rgb, question) -> str`` with a trained model directory (PyTorch)."""

    def __init__(self, model_dir: str, device: str = 'cpu'):
        self.model = BlueLMV.from_pretrained(model_dir, device=device)
        self.tok = VLMTokenizer.from_dir(model_dir, self.model.config)
        self.dr = DynamicResolution.from_config(self.model.config)
        self.device = device

    @torch.no_grad()
    def __call__(self, image: np.ndarray, question: str, max_new_tokens: int = 24) -> str:
        """Answer one question about an RGB uint8 image."""
        tiled = self.dr(image)
        ids = torch.tensor([self.tok.build_prompt(question, tiled.num_tokens)],
                           device=self.device)
        out = self.model.generate_greedy(ids, torch.from_numpy(tiled.tiles).to(self.device),
                                         max_new_tokens=max_new_tokens)
        return self.tok.decode(out).strip()


# ---------------------------------------------------------------------------
# learning curve


class LearningCurve:
    """Validation accuracy vs steps and wall time, kept in a JSON file (+ a PNG plot).

    Measured on :data:`scene_qa_data.VALIDATION_SEED_BASE` seeds, never on the reported
    held-out set. Wall time includes these measurements (they are part of the run).
    """

    def __init__(self, path: str, resume: bool):
        self.path = path
        self.points = []
        if resume and os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                self.points = json.load(f)['points']

    def measure(self, model, tok, step: int, elapsed: float, n_per_type: int, device) -> dict:
        """Evaluate greedily in fp32, append a point and rewrite the file."""
        result = evaluate_model(model, tok, n_per_type, device,
                                base=sqa.VALIDATION_SEED_BASE, progress=False)
        point = {'step': step, 'wall_seconds': round(elapsed, 1),
                 'overall': round(result['overall'], 4),
                 'per_type': {t: round(v['accuracy'], 4)
                              for t, v in result['per_type'].items()}}
        self.points.append(point)
        with open(self.path, 'w', encoding='utf-8') as f:
            json.dump({'seed_base': sqa.VALIDATION_SEED_BASE, 'per_type': n_per_type,
                       'points': self.points}, f, indent=1)
        tqdm.write(f'vlm-train: step {step} ({elapsed / 60:.1f} min) validation '
                   f'{point["overall"] * 100:.1f} % ' + ' '.join(
                       f'{t[:4]} {a * 100:.0f}' for t, a in point['per_type'].items()))
        return point

    def plot(self) -> None:
        """Accuracy vs wall minutes and vs steps, overall and per type."""
        if not self.points:
            return
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in ((axes[0], 'wall_seconds', 'wall time (min)'),
                               (axes[1], 'step', 'optimizer steps')):
            xs = [p[key] / (60 if key == 'wall_seconds' else 1) for p in self.points]
            for t in sqa.QTYPES:
                ax.plot(xs, [p['per_type'].get(t, 0) * 100 for p in self.points], lw=1,
                        label=t)
            ax.plot(xs, [p['overall'] * 100 for p in self.points], 'k', lw=2.5,
                    label='overall')
            ax.axhline(90, color='grey', ls=':')
            ax.set_xlabel(label)
            ax.set_ylabel('validation exact match (%)')
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8, loc='lower right')
        fig.tight_layout()
        fig.savefig(os.path.splitext(self.path)[0] + '.png', dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------
# training


def lr_at(step: int, progress: float, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to ``peak*min_ratio``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay matrices (linear, conv, embeddings); not norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def cpu_has_bf16() -> bool:
    """Tell whether this CPU has native bf16 dot products (AVX512-BF16 or AMX on x86)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            flags = f.read()
    except OSError:
        return False
    return ' avx512_bf16' in flags or ' amx_bf16' in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs with bf16 units, else fp32.

    bf16 autocast on this project's AVX512-BF16 CPU: 4.2 s vs 9-10 s per 32-scene step.
    """
    if name != 'auto':
        return name
    return 'bf16' if device.type == 'cuda' or cpu_has_bf16() else 'fp32'


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def _progress(step, elapsed, steps, time_limit) -> float:
    p = 0.0
    if steps:
        p = max(p, step / steps)
    if time_limit:
        p = max(p, elapsed / time_limit)
    return p


def save_checkpoint(path, model, aux_head, opt, step, elapsed, args) -> None:
    """Atomically write model + aux head + optimizer state and the run position."""
    tmp = path + '.tmp'
    torch.save({'model': model.state_dict(), 'aux_head': aux_head.state_dict(),
                'optimizer': opt.state_dict(), 'step': step,
                'elapsed': elapsed, 'config': model.config.to_dict(),
                'args': {k: v for k, v in vars(args).items() if not k.startswith('_')}}, tmp)
    os.replace(tmp, path)


def load_weights(ckpt: str, model: BlueLMV, aux_head: torch.nn.Module,
                 device: torch.device) -> dict:
    """Load the model and aux head from a checkpoint, every key matching; return the state.

    Strict on purpose: a stage that silently re-initialised part of the model would look
    like a bad recipe rather than a bad load.
    """
    state = torch.load(ckpt, map_location=device, weights_only=False)
    model.load_state_dict(state['model'], strict=True)
    aux_head.load_state_dict(state['aux_head'], strict=True)
    return state


def train(args) -> dict:
    """Train (or resume) and return a summary; the model is saved into ``args.out``."""
    device = _device(args.device)
    cuda = device.type == 'cuda'
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == 'cpu':
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    precision = resolve_precision(args.precision, device)
    config = load_config(args.config)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    tok_path = os.path.join(args.out, TOKENIZER_FILE)
    resume = args.resume and os.path.exists(ckpt_path)
    if args.resume and not resume:
        print(f'vlm-train: no {ckpt_path}, starting from scratch')
    # --init-from: a new stage (fresh optimizer and schedule) from another run's weights
    init_ckpt = os.path.join(args.init_from, CHECKPOINT) if args.init_from and not resume \
        else None
    if init_ckpt:
        if not os.path.exists(init_ckpt):
            raise SystemExit(f'vlm-train: --init-from needs {init_ckpt} '
                             '(a finished or interrupted run)')
        # the new stage keeps the first stage's vocabulary
        shutil.copyfile(os.path.join(args.init_from, TOKENIZER_FILE), tok_path)
    tok = (VLMTokenizer(tok_path, config) if (resume or init_ckpt) and os.path.exists(tok_path)
           else train_tokenizer(tok_path, config))
    model = BlueLMV(config).to(device)
    aux_head = AuxHead(config.vision.hidden_size).to(device)
    if init_ckpt:
        state = load_weights(init_ckpt, model, aux_head, device)
        print(f'vlm-train: stage starts from {init_ckpt} (step {int(state["step"])}, '
              f'{float(state["elapsed"]):.0f} s trained)')
    both = torch.nn.ModuleList([model, aux_head])
    opt = torch.optim.AdamW(param_groups(both, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.95), eps=1e-8, **({'fused': True} if cuda else {}))
    step, elapsed = 0, 0.0
    if resume:
        state = load_weights(ckpt_path, model, aux_head, device)
        opt.load_state_dict(state['optimizer'])
        step, elapsed = int(state['step']), float(state['elapsed'])
        print(f'vlm-train: resumed {ckpt_path} at step {step} ({elapsed:.0f} s trained)')
    n_params = count_parameters(config)['total']
    print(f'vlm-train: {config.name} {n_params / 1e6:.2f} M parameters {describe(model)} '
          f'on {device}')

    if not args.steps and not args.time_limit:
        raise SystemExit('vlm-train: give --steps and/or --time-limit')
    max_steps = args.steps or 10 ** 9
    base = args.seed * DATA_SEED_STRIDE
    length = min(max(0, max_steps - step), DATA_SEED_STRIDE // args.batch_scenes - step)
    data = SceneQATrainSet(tok, config, base + step * args.batch_scenes,
                           max(0, length) * args.batch_scenes,
                           qtypes=QUESTION_SETS[args.questions],
                           scale_range=tuple(args.train_scale), min_side=args.min_side,
                           flip=not args.no_flip, aux=args.aux_weight > 0)
    workers = args.workers
    loader = DataLoader(data, batch_size=args.batch_scenes, shuffle=False,
                        num_workers=workers, collate_fn=collate_train, pin_memory=cuda,
                        worker_init_fn=_worker_init, persistent_workers=False,
                        prefetch_factor=(args.prefetch if workers else None), drop_last=True)
    log = open(os.path.join(args.out, LOG_FILE), 'a', encoding='utf-8')
    bar = tqdm(total=args.steps or None, initial=step, desc='vlm-train', unit='step',
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    both.train()
    t_start = time.time() - elapsed
    last_ckpt = time.time()
    win_loss, win_acc, win_seq, win_t = 0.0, 0.0, 0, time.time()
    n_seq_total = 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
    curve = LearningCurve(os.path.join(args.out, CURVE_FILE), resume)
    loss_hist = []
    stop_reason = 'steps'
    for batch in loader:
        elapsed = time.time() - t_start
        progress = _progress(step, elapsed, args.steps, args.time_limit)
        if progress >= 1.0:
            stop_reason = 'time' if args.time_limit and elapsed >= args.time_limit else 'steps'
            break
        lr = lr_at(step, progress, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g['lr'] = lr
        with amp:
            loss, acc, aux_loss = batch_loss(model, batch, device, aux_head, args.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), args.clip)
        opt.step()
        step += 1
        n = int(batch['qtype'].numel())  # questions (several per packed sequence)
        n_seq_total += n
        win_seq += n
        if step % args.log_every == 0 or step <= 3:
            xv = float(aux_loss)
            lv = float(loss.detach()) - args.aux_weight * xv  # answer loss
            av = float(acc)
            loss_hist.append(lv)
            win_loss, win_acc = lv, av
            dt = max(time.time() - win_t, 1e-9)
            rec = {'step': step, 'loss': round(lv, 5), 'aux_loss': round(xv, 5),
                   'answer_token_acc': round(av, 4),
                   'lr': lr, 'elapsed': round(time.time() - t_start, 1),
                   'q_per_s': round(win_seq / dt, 1), 'questions': n_seq_total}
            log.write(json.dumps(rec) + '\n')
            log.flush()
            bar.set_postfix(loss=f'{win_loss:.3f}', aux=f'{xv:.3f}', acc=f'{win_acc:.3f}',
                            lr=f'{lr:.1e}',
                            q_s=f'{win_seq / dt:.0f}', prog=f'{progress * 100:.0f}%')
            win_seq, win_t = 0, time.time()
        bar.update(1)
        if args.curve_every and step % args.curve_every == 0:
            curve.measure(model, tok, step, time.time() - t_start, args.curve_per_type,
                          device)
            both.train()
        if args.ckpt_every and time.time() - last_ckpt > args.ckpt_every:
            save_checkpoint(ckpt_path, model, aux_head, opt, step, time.time() - t_start,
                            args)
            last_ckpt = time.time()
    else:
        stop_reason = 'steps' if step >= max_steps else 'data'
    bar.close()
    log.close()
    elapsed = time.time() - t_start
    del loader
    if args.curve_every and (not curve.points or curve.points[-1]['step'] != step):
        curve.measure(model, tok, step, elapsed, args.curve_per_type, device)
    curve.plot()
    save_checkpoint(ckpt_path, model, aux_head, opt, step, elapsed, args)
    model.save_pretrained(args.out)
    summary = {'config': config.name, 'parameters': n_params, 'steps': step,
               'train_seconds': round(elapsed, 1), 'questions_this_run': n_seq_total,
               'renders_seen': step * args.batch_scenes, 'flip': not args.no_flip,
               'aux_weight': args.aux_weight, 'stop': stop_reason,
               'precision': precision, 'threads': torch.get_num_threads(),
               'batch_scenes': args.batch_scenes, 'questions': args.questions,
               'learning_curve': CURVE_FILE if curve.points else None,
               'device': torch.cuda.get_device_name(device) if cuda else 'cpu',
               'final_loss': loss_hist[-1] if loss_hist else None, 'losses': loss_hist}
    print(f'vlm-train: {step} steps in {elapsed:.0f} s (stop: {stop_reason}); '
          f'model saved to {args.out}')
    return summary


# ---------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    """Add the ``vlm-train`` options to an argparse parser."""
    p.add_argument('--out', required=True, help='output folder (model, tokenizer, logs)')
    p.add_argument('--config', default='scene-tiny', help='config name or JSON path')
    p.add_argument('--steps', type=int, default=None, help='optimizer steps')
    p.add_argument('--time-limit', type=float, default=None,
                   help='training seconds (the LR schedule ends at the deadline)')
    p.add_argument('--batch-scenes', type=int, default=32,
                   help='rendered scenes per step (x2 with the mirror images), each with '
                        'up to 12 questions packed in one sequence')
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--min-lr-ratio', type=float, default=0.05)
    p.add_argument('--warmup', type=int, default=200, help='warmup steps')
    p.add_argument('--aux-weight', type=float, default=1.0,
                   help='weight of the auxiliary per-patch class/colour loss on the ViT '
                        '(training only; 0 disables)')
    p.add_argument('--no-flip', action='store_true',
                   help='do not also train on the mirror image of each scene')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--clip', type=float, default=1.0, help='gradient norm clip')
    p.add_argument('--seed', type=int, default=0, help='init seed and data seed block (0..9)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1, ...')
    p.add_argument('--workers', type=int, default=None,
                   help='DataLoader workers (default: CPUs - 2, 0 for --dry-run)')
    p.add_argument('--prefetch', type=int, default=6, help='batches prefetched per worker')
    p.add_argument('--train-scale', type=float, nargs=2, default=list(TRAIN_SCALE),
                   metavar=('LO', 'HI'), help='render scale range of training scenes')
    p.add_argument('--min-side', type=int, default=MIN_SIDE,
                   help='smallest short side of a rendered training scene')
    p.add_argument('--log-every', type=int, default=25)
    p.add_argument('--ckpt-every', type=float, default=120.0, help='seconds between checkpoints')
    p.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.pt')
    p.add_argument('--init-from', default=None, metavar='RUN_DIR',
                   help='start a new stage from RUN_DIR/checkpoint.pt weights (fresh '
                        'optimizer and learning-rate schedule, same tokenizer); give a '
                        'different --seed so the stage sees new scenes')
    p.add_argument('--eval-per-type', type=int, default=200,
                   help='held-out questions per type (0: no evaluation)')
    p.add_argument('--eval-mode', choices=('batched', 'single'), default='batched')
    p.add_argument('--eval-batch', type=int, default=128)
    p.add_argument('--eval-only', action='store_true',
                   help='evaluate the model saved in --out, no training')
    p.add_argument('--questions', choices=tuple(QUESTION_SETS), default='extra',
                   help='per training scene: one question per type, two, or two plus '
                        'extra colour and position questions (focus)')
    p.add_argument('--precision', choices=('auto', 'bf16', 'fp32'), default='auto',
                   help='training autocast (auto: bf16 on CUDA and bf16-capable CPUs); '
                        'evaluation is always fp32')
    p.add_argument('--threads', type=int, default=0,
                   help='torch threads on CPU (0: every core)')
    p.add_argument('--curve-every', type=int, default=0,
                   help='measure validation accuracy every N steps (learning curve)')
    p.add_argument('--curve-per-type', type=int, default=20,
                   help='validation questions per type for each learning-curve point')
    p.add_argument('--dry-run', type=int, default=None, metavar='STEPS',
                   help='pipeline check: at most STEPS CPU steps (40 s), one small scene '
                        '(+ mirror) a step, 2 eval questions per type')


def run(args) -> int:
    """Train and/or evaluate; writes ``eval.json`` and prints per-type accuracy."""
    if args.dry_run:
        args.device = 'cpu'
        args.steps = args.dry_run
        args.batch_scenes = 1
        args.questions = 'types'
        args.train_scale = [0.3, 0.3]
        args.warmup = min(args.warmup, max(1, args.dry_run // 4))
        args.log_every = 1
        args.eval_per_type = min(args.eval_per_type, 2)
        args.eval_batch = min(args.eval_batch, 12)
        args.time_limit = args.time_limit or 40.0
    if args.workers is None:
        # Rendering overlaps training in worker processes; on 2 cores one worker (about
        # 30 scenes/s) keeps up with the bf16 model.
        args.workers = 0 if args.dry_run else max(1, min(14, (os.cpu_count() or 2) - 2))
    t0 = time.time()
    summary = None
    if not args.eval_only:
        summary = train(args)
    device = _device(args.device)
    if not args.eval_per_type:
        return 0
    model = BlueLMV.from_pretrained(args.out, device=str(device))
    tok = VLMTokenizer.from_dir(args.out, model.config)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 numbers
        torch.backends.cudnn.allow_tf32 = False
    te = time.time()
    result = evaluate_model(model, tok, args.eval_per_type, device, args.workers,
                            args.eval_batch, args.eval_mode)
    result['eval_seconds'] = round(time.time() - te, 1)
    result['total_seconds'] = round(time.time() - t0, 1)
    result['precision'] = 'fp32'
    result['eval_mode'] = args.eval_mode
    if summary is not None:
        result['training'] = summary
    records = result.pop('records')
    with open(os.path.join(args.out, EVAL_FILE), 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, 'eval_predictions.jsonl'), 'w', encoding='utf-8') as f:
        for r in records:
            f.write(json.dumps(r) + '\n')
    print(sqa.format_scores(result))
    print(f'vlm-train: eval {result["eval_seconds"]} s, total {result["total_seconds"]} s; '
          f'wrote {os.path.join(args.out, EVAL_FILE)}')
    return 0


def main(argv=None) -> int:
    """``python -m bluelm_ros.tools.vlm.train``."""
    import argparse
    p = argparse.ArgumentParser(prog='python -m bluelm_ros.tools.vlm.train',
                                description='train the scene-QA BlueLM-V model')
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == '__main__':
    raise SystemExit(main())

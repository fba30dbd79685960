"""Model definitions (``*.json`` next to this file) and their analytic parameter counts.

``bluelm-v-3b`` (the paper's shapes, random weights for benchmarks), ``scene-tiny`` (the
shipped scene-QA model) and ``tiny-test`` (the tests' random model). A config file is a
:class:`~bluelm_ros.runtime.vlm.config.BlueLMVConfig`; an exported bundle carries its own
copy, so the robot never needs these files.

``python -m bluelm_ros.tools.vlm.configs [name-or-path ...]`` prints the parameter counts.
"""

from __future__ import annotations

import os
import sys

from bluelm_ros.runtime.vlm.config import BlueLMVConfig

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def load_config(name_or_path: str) -> BlueLMVConfig:
    """Load ``<CONFIG_DIR>/<name>.json`` or a config file path."""
    path = name_or_path
    if not os.path.exists(path) and not path.endswith('.json'):
        path = os.path.join(CONFIG_DIR, name_or_path + '.json')
    return BlueLMVConfig.from_json(path)


# ---------------------------------------------------------------------------
# parameter counting (analytic; tests check it against the torch module)


def _act_params(n_in, n_out, bias):
    return n_in * n_out + (n_out if bias else 0)


def count_parameters(config: BlueLMVConfig) -> dict:
    """Count parameters per component from the config alone.

    Returns a dict with ``vision``, ``downsampler``, ``projector``, ``llm``,
    ``llm_embeddings`` (embed_tokens + untied lm_head) and ``total``.
    """
    v, t = config.vision, config.text
    c = v.hidden_size
    patch = v.num_channels * v.patch_size ** 2 * c + (c if v.patch_bias else 0)
    pos = (v.grid ** 2 + int(v.class_token)) * c + (c if v.class_token else 0)
    block = (4 * c  # two LayerNorms
             + 4 * _act_params(c, c, True)
             + _act_params(c, v.intermediate_size, True)
             + _act_params(v.intermediate_size, c, True))
    vision = patch + pos + block * v.num_layers_used()
    if v.post_layernorm:
        vision += 2 * c
    if v.pre_layernorm:
        vision += 2 * c

    down = 0
    if config.downsampler != 'none':
        merged = config.vision_feature_dim * config.downsample_factor ** 2
        if config.downsampler_norm:
            down += 2 * merged
        if config.downsampler_dim > 0:
            down += _act_params(merged, config.downsampler_dim, True)

    d = t.hidden_size
    pin = config.projector_in_dim
    if config.projector == 'mlp2':
        proj = (_act_params(pin, d, config.projector_bias)
                + _act_params(d, d, config.projector_bias))
    else:
        proj = _act_params(pin, d, config.projector_bias)

    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    ab = t.attention_bias
    layer = (2 * d
             + _act_params(d, q, ab) + 2 * _act_params(d, kv, ab) + _act_params(q, d, ab)
             + 2 * _act_params(d, t.intermediate_size, t.mlp_bias)
             + _act_params(t.intermediate_size, d, t.mlp_bias))
    emb = t.vocab_size * d * (1 if t.tie_word_embeddings else 2)
    llm = emb + layer * t.num_hidden_layers + d
    return {'vision': vision, 'downsampler': down, 'projector': proj, 'llm': llm,
            'llm_embeddings': emb, 'total': vision + down + proj + llm}


def format_parameter_counts(config: BlueLMVConfig) -> str:
    """Human-readable parameter table."""
    n = count_parameters(config)
    rows = [('vision (ViT)', n['vision']), ('downsampler', n['downsampler']),
            ('projector', n['projector']), ('llm', n['llm']),
            ('  of which embeddings/lm_head', n['llm_embeddings']), ('total', n['total'])]
    return '\n'.join(f'{config.name}: {k:<30s} {val:>15,d}  ({val / 1e6:9.2f} M)'
                     for k, val in rows)


def main(argv=None) -> int:
    """Print parameter counts of configs given by name or path."""
    argv = sys.argv[1:] if argv is None else argv
    for name in argv or ['bluelm-v-3b', 'tiny-test']:
        print(format_parameter_counts(load_config(name)))
    return 0

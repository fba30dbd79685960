"""Idefics3 / SmolVLM: SigLIP with post-layernorm, pixel-shuffle connector, Llama text model.

The connector is our ``pixel_shuffle`` downsampler + one linear without bias; the text
model is Llama / SmolLM2 (SmolVLM-256M/500M-Instruct are this architecture). The
processor's image splitting (crops + global image, row/column marker tokens,
``image_seq_len``), chat template and stop tokens (``<end_of_utterance>``) are recorded in
the config and reproduced at run time.
"""
import os

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, PromptConfig
from bluelm_ros.tools.vlm.convert.common import (attach_checkpoint_assets, Family,
                                                 image_config,
                                                 LLAMA_DEFAULTS, read_hf_config,
                                                 SIGLIP_VISION_DEFAULTS, text_config,
                                                 token_ids, validated, vision_config,
                                                 WeightLayout)

VISION_DEFAULTS = dict(SIGLIP_VISION_DEFAULTS, hidden_size=1152, num_attention_heads=16,
                       patch_size=32)
LAYOUT = WeightLayout(
    lm_head=('lm_head.weight',),
    vision=('model.vision_model.',),
    projector=('model.connector.',),
    projector_map={'modality_projection.proj.weight': 'projector.linear_1.weight'},
    text=('model.text_model.',),
)


def config(hf_dir: str) -> BlueLMVConfig:
    """Translate an Idefics3 / SmolVLM ``config.json`` into a :class:`BlueLMVConfig`."""
    source, top = read_hf_config(hf_dir, ('idefics3', 'smolvlm'))
    mt = top['model_type']
    tc = top['text_config']
    tie = bool(top.get('tie_word_embeddings') or tc.get('tie_word_embeddings'))
    vision = vision_config(top['vision_config'], source, VISION_DEFAULTS,
                           ('idefics3_vision', 'smolvlm_vision'), feature_layer=-1,
                           feature_select_strategy='full', post_layernorm=True)
    text = text_config(tc, source, dict(LLAMA_DEFAULTS, rms_norm_eps=1e-5), tie)
    bos, eos, pad = token_ids(tc, top)
    scale = int(top.get('scale_factor', 2))
    cfg = BlueLMVConfig(
        name=os.path.basename(os.path.normpath(hf_dir)) or mt,
        vision=vision, text=text, image=image_config(hf_dir, vision.image_size),
        prompt=PromptConfig(template='User:{image}{question}<end_of_utterance>\nAssistant:',
                            system_template='System: {system}<end_of_utterance>\n',
                            add_bos=bos is not None),
        downsampler='pixel_shuffle', downsample_factor=scale, downsampler_norm=False,
        downsampler_dim=0, projector='linear', projector_act='gelu', projector_bias=False,
        image_token_id=top.get('image_token_id', 128257),
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)
    attach_checkpoint_assets(cfg, hf_dir)
    return validated(cfg, source)


FAMILY = Family('idefics3', 'Idefics3ForConditionalGeneration / SmolVLM', config, LAYOUT)

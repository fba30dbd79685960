"""LLaVA: ``LlavaForConditionalGeneration`` with a SigLIP or CLIP tower and a Llama text model.

LLaVA has no token downsampler; its ``multi_modal_projector`` (linear-gelu-linear) maps to
our ``mlp2`` projector and ``vision_feature_layer`` / ``vision_feature_select_strategy``
carry over unchanged. A CLIP tower (LLaVA-1.5) adds a class token, a pre-layernorm, a
bias-free patch conv and quick_gelu. Its image processor (SigLIP's stretch, CLIP's
shortest edge + centre crop, LLaVA's optional pad to square) is recorded in the config
and reproduced at run time, as are its chat template and stop tokens.
"""
import os

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, PromptConfig
from bluelm_ros.tools.vlm.convert.common import (act, attach_checkpoint_assets,
                                                 CLIP_VISION_DEFAULTS, Family, image_config,
                                                 LLAMA_DEFAULTS, read_hf_config,
                                                 SIGLIP_VISION_DEFAULTS, text_config,
                                                 token_ids, validated, vision_config,
                                                 WeightLayout)

LAYOUT = WeightLayout(
    lm_head=('lm_head.weight', 'language_model.lm_head.weight'),
    # transformers 4.x nests SiglipVisionTransformer under ``vision_model``; 5.x saves
    # without it; ``model.`` prefixes appear in 4.52+ in-memory names
    vision=('model.vision_tower.vision_model.', 'vision_tower.vision_model.',
            'model.vision_tower.', 'vision_tower.'),
    projector=('model.multi_modal_projector.', 'multi_modal_projector.'),
    projector_map={'linear_1.weight': 'projector.linear_1.weight',
                   'linear_1.bias': 'projector.linear_1.bias',
                   'linear_2.weight': 'projector.linear_2.weight',
                   'linear_2.bias': 'projector.linear_2.bias'},
    text=('model.language_model.model.', 'language_model.model.', 'model.language_model.',
          'language_model.'),
)


def config(hf_dir: str) -> BlueLMVConfig:
    """Translate a LLaVA (SigLIP/CLIP + Llama) ``config.json`` into a :class:`BlueLMVConfig`."""
    source, top = read_hf_config(hf_dir, ('llava',))
    tc = top['text_config']
    tie = bool(top.get('tie_word_embeddings') or tc.get('tie_word_embeddings'))
    fl = top.get('vision_feature_layer', -2)
    strategy = top.get('vision_feature_select_strategy', 'default')
    if top['vision_config'].get('model_type') == 'clip_vision_model':
        vision = vision_config(top['vision_config'], source, CLIP_VISION_DEFAULTS,
                               ('clip_vision_model',), feature_layer=fl,
                               feature_select_strategy=strategy, post_layernorm=False,
                               class_token=True, pre_layernorm=True, patch_bias=False)
    else:
        vision = vision_config(top['vision_config'], source, SIGLIP_VISION_DEFAULTS,
                               ('siglip_vision_model', 'clip_vision_model'), feature_layer=fl,
                               feature_select_strategy=strategy, post_layernorm=False)
    text = text_config(tc, source, LLAMA_DEFAULTS, tie)
    bos, eos, pad = token_ids(tc, top)
    cfg = BlueLMVConfig(
        name=os.path.basename(os.path.normpath(hf_dir)) or 'llava',
        vision=vision, text=text, image=image_config(hf_dir, vision.image_size),
        prompt=PromptConfig(template='USER: {image}\n{question} ASSISTANT:',
                            system_template='{system} ', add_bos=bos is not None),
        downsampler='none', downsample_factor=1, downsampler_norm=False, downsampler_dim=0,
        projector='mlp2',
        projector_act=act(top.get('projector_hidden_act', 'gelu'), source,
                          'projector_hidden_act'),
        projector_bias=bool(top.get('multimodal_projector_bias', True)),
        image_token_id=top.get('image_token_index', top.get('image_token_id', 32000)),
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)
    attach_checkpoint_assets(cfg, hf_dir, strategy)
    return validated(cfg, source)


FAMILY = Family('llava', 'LlavaForConditionalGeneration (SigLIP or CLIP + Llama)', config,
                LAYOUT)

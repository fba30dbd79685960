"""Fused transformer ops for the exported vision tower (offline, at export time).

The TorchScript export of the SigLIP/CLIP tower is plain ONNX ops: per layer three
projection MatMuls, the score/softmax/value MatMuls, LayerNorm, a tanh-GELU written out
as eight ops and the residual Adds. ONNX Runtime's transformer optimizer rewrites that
into its fused CPU kernels: ``Attention`` (QKV projection + attention in one op),
``SkipLayerNormalization`` (residual add + LayerNorm), ``FastGelu``. The int8 export
then quantizes the MatMuls *and* the fused ``Attention`` (``QAttention``), so every
projection runs with int8 activations.

Only the Python fusion passes run (``opt_level=0``): the saved graph holds no
hardware-specific rewrites and loads on any ONNX Runtime build, ARM included.
"""

from __future__ import annotations

from collections import Counter
import logging

from bluelm_ros.runtime.vlm.config import VisionConfig

# the op types the quantizer sees in a fused graph / in a plain one
FUSED_QUANT_OPS = ['MatMul', 'Attention']
PLAIN_QUANT_OPS = ['MatMul']


def fuse_vision_graph(src: str, dst: str, vision: VisionConfig) -> dict:
    """Write ``src`` with fused attention / layer norm / GELU to ``dst``; return op counts.

    Raises when no attention was fused (the pattern did not match: a plain graph under a
    "fused" label would be a silent slowdown).
    """
    from onnxruntime.transformers.optimizer import optimize_model
    # the optimizer logs every pass at INFO/WARNING; the counts below say what it did
    logging.getLogger('onnxruntime.transformers').setLevel(logging.ERROR)
    model = optimize_model(src, model_type='clip', num_heads=vision.num_attention_heads,
                           hidden_size=vision.hidden_size, opt_level=0, use_gpu=False)
    counts = Counter(node.op_type for node in model.model.graph.node)
    fused = {op: counts[op] for op in ('Attention', 'SkipLayerNormalization',
                                       'LayerNormalization', 'FastGelu', 'Gelu')
             if counts[op]}
    if not fused.get('Attention'):
        raise RuntimeError('vision fusion matched no attention block of this tower; export '
                           'with --no-vision-fusion')
    model.save_model_to_file(dst, use_external_data_format=True)
    return fused

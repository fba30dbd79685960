"""Fold BatchNorm into the convolution before it, for inference.

The official DSNet times its models with BatchNorm removed this way, and ONNX Runtime's
graph optimizer does the same fold, so an eager-vs-ORT comparison that leaves BN in the
eager model credits ORT with a fold anyone can do in PyTorch. A BatchNorm whose input
is not a conv's output (the aux heads' pre-BN) stays.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, bn name) for every BN whose input is exactly a conv's output.

    Found by running the model once with hooks rather than by child names: the heads
    apply ``bn1`` *before* ``conv1`` and ``bn2`` after it, which names cannot tell.
    """
    producer, pairs, hooks = {}, [], []
    names = {m: n for n, m in model.named_modules()}

    def conv_out(mod, _inp, out):
        producer[id(out)] = (names[mod], out)

    def bn_in(mod, inp):
        hit = producer.get(id(inp[0]))
        if hit is not None and hit[1] is inp[0]:
            pairs.append((hit[0], names[mod]))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_out))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_in))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(model: nn.Module, example: Optional[torch.Tensor] = None
                   ) -> Tuple[nn.Module, int]:
    """Return (an eval-mode copy with BN folded into convs, number of BNs folded)."""
    model = copy.deepcopy(model).eval()
    example = example if example is not None else torch.zeros(1, 3, 64, 64)
    pairs = _conv_bn_pairs(model, example)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _replace(model, conv_name, _fold(conv, bn))
        _replace(model, bn_name, nn.Identity())
    return model, len(pairs)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, new)

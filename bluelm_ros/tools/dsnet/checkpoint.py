"""Strict loading of official DSNet checkpoints (and our own) into :class:`DSNet`.

Upstream training saves ``FullModel.state_dict()``: model weights under a
``model.`` prefix, the training-only aux heads (``model.seghead_p.*``,
``model.seghead_d.*``) and the loss modules' class weights
(``sem_loss.criterion.weight``, saved as CUDA tensors). ``*.pth.tar`` files
wrap that as ``{'epoch', 'best_mIoU', 'state_dict', 'optimizer'}``.

The upstream loader strips prefixes and loads with ``strict=False``, so a
wrong file silently loads nothing. Here every model key must be present with
the right shape, or :class:`CheckpointError` says what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from bluelm_ros.tools.dsnet.model import (VARIANTS, DSNet, DSNetVariant, expected_shapes,
                                          get_variant)

PathLike = Union[str, 'os.PathLike[str]']

AUX_PREFIXES = ('seghead_p.', 'seghead_d.')
# Prefixes of training-wrapper state that is not part of the network.
LOSS_PREFIXES = ('sem_loss.', 'ce_loss.', 'bd_loss.', 'criterion.', 'loss.')
# Wrapper prefixes, outermost first: DataParallel 'module.', then FullModel 'model.'.
WRAPPER_PREFIXES = ('module.', 'model.')
# The final classifier conv: its output channels are the class count.
CLASSIFIER_KEY = 'lastlayer.conv2.weight'
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint does not match the requested DSNet variant / class count."""


def _torch_load(path: PathLike) -> object:
    # weights_only=True refuses arbitrary pickles; upstream .pth.tar files also hold
    # numpy scalars (best_mIoU = IoU_array.mean()), so allow exactly those types.
    safe: List[object] = []
    try:
        import numpy as np
        safe = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar  # type: ignore[no-redef]
        # Files pickled under numpy 1.x name it numpy.core.multiarray.scalar.
        safe += [scalar, (scalar, 'numpy.core.multiarray.scalar'),
                 (scalar, 'numpy._core.multiarray.scalar')]
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f'{path}: cannot read as a PyTorch checkpoint with weights_only=True ({exc}). '
            'If the file is trusted, torch.load(..., weights_only=False) it yourself and '
            'pass the dict to normalize_state_dict()') from exc


def _unwrap(obj: object, path: PathLike) -> Mapping[str, torch.Tensor]:
    # Accept a plain state dict, or a training wrapper holding one.
    if isinstance(obj, Mapping):
        for key in ('state_dict', 'model'):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        if obj and all(isinstance(k, str) for k in obj):
            return obj
    raise CheckpointError(f'{path}: expected a state dict or a dict with a "state_dict" '
                          f'or "model" entry, got {type(obj).__name__}')


def normalize_state_dict(state: Mapping[str, object], keep_aux: bool = False,
                         source: str = '<state_dict>') -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop loss (and, by default, aux-head) entries."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in LOSS_PREFIXES):
            continue
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if any(key.startswith(p) for p in LOSS_PREFIXES):
            continue
        if not keep_aux and key.startswith(AUX_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'{source}: entry {key!r} is a {type(value).__name__}, '
                                  'not a tensor')
        if key in out:
            raise CheckpointError(f'{source}: key {key!r} appears twice after stripping '
                                  'prefixes')
        out[key] = value
    return out


def load_official_state_dict(path: PathLike, keep_aux: bool = False
                             ) -> Dict[str, torch.Tensor]:
    """Read a DSNet checkpoint into a plain ``{DSNet key: tensor}`` dict on the CPU.

    Accepts a plain state dict, an upstream ``*.pth.tar`` wrapper or any dict with a
    ``state_dict``/``model`` entry. Strips ``module.``/``model.`` prefixes and drops loss
    weights (``sem_loss.*``, ``criterion.*``, ...) and, unless ``keep_aux``, the
    ``seghead_p``/``seghead_d`` aux heads.
    """
    obj = _torch_load(path)
    return normalize_state_dict(_unwrap(obj, path), keep_aux=keep_aux, source=str(path))


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f'{len(keys)}: {shown}' + (f', ... (+{more} more)' if more > 0 else '')


def _classes_in(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    w = state.get(CLASSIFIER_KEY)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 4 else None


def _matching_variants(state: Mapping[str, torch.Tensor], num_classes: int) -> List[str]:
    have = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
    return [name for name in VARIANTS
            if expected_shapes(name, num_classes) == have]


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, int]:
    """Guess ``(variant name, num_classes)`` from a state dict's key set and shapes.

    Accepts raw (prefixed) or normalised dicts; aux-head keys are ignored. Raises
    :class:`CheckpointError` when no variant or more than one variant matches.
    """
    state = normalize_state_dict(state_dict, keep_aux=False)
    num_classes = _classes_in(state)
    if num_classes is None:
        raise CheckpointError(f'cannot infer the class count: no {CLASSIFIER_KEY!r} '
                              'in the state dict (not a DSNet checkpoint?)')
    matches = _matching_variants(state, num_classes)
    if len(matches) == 1:
        return matches[0], num_classes
    if not matches:
        planes = state.get('conv1.0.weight')
        hint = f' (stem width {planes.shape[0]})' if isinstance(planes, torch.Tensor) else ''
        raise CheckpointError(f'no DSNet variant matches this state dict{hint} with '
                              f'{num_classes} classes; known variants: {sorted(VARIANTS)}')
    raise CheckpointError(f'ambiguous state dict: variants {matches} all match')


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                     source: str = '<state_dict>') -> None:
    """Raise :class:`CheckpointError` unless ``state`` matches ``model`` key for key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return

    problems = []
    if missing:
        problems.append(f'missing keys {_listing(missing)}')
    if unexpected:
        problems.append(f'unexpected keys {_listing(unexpected)}')
    if wrong:
        details = [f'{k} {tuple(state[k].shape)} != {expected[k]}' for k in sorted(wrong)]
        more = len(details) - _MAX_LISTED
        problems.append(f'shape mismatches {len(wrong)}: ' + ', '.join(details[:_MAX_LISTED])
                        + (f', ... (+{more} more)' if more > 0 else ''))

    hints = []
    variant = getattr(model, 'variant', None)
    want_classes = getattr(model, 'num_classes', None)
    got_classes = _classes_in(state)
    if got_classes is not None and want_classes is not None and got_classes != want_classes:
        hints.append(f'the checkpoint has {got_classes} classes, not {want_classes}: '
                     f'try num_classes={got_classes}')
    try:
        name, _ = infer_variant(state)
        if variant is None or name != variant.name:
            hints.append(f'the weights look like variant {name!r}: try variant={name!r}')
    except CheckpointError:
        pass
    aux_missing = [k for k in missing if k.startswith(AUX_PREFIXES)]
    if aux_missing and len(aux_missing) == len(missing) and not (unexpected or wrong):
        hints.append('the file has no aux heads (an eval checkpoint): use aux_heads=False')
    if not hints:
        hints.append('is this a DSNet checkpoint for this variant?')

    vname = variant.name if variant is not None else type(model).__name__
    # Hint first: the key listings can be long.
    raise CheckpointError(f'{source} does not match DSNet {vname!r} with {want_classes} '
                          'classes. Hint: ' + '; '.join(hints) + '. Details: '
                          + '; '.join(problems))


def load_dsnet(path: PathLike, variant: Union[str, DSNetVariant], num_classes: int,
               aux_heads: bool = False) -> DSNet:
    """Build ``DSNet(variant, num_classes, aux_heads)`` and load ``path`` into it strictly.

    Every model key must be present with the right shape; anything missing,
    unexpected or mis-shaped raises :class:`CheckpointError`. The model is
    returned in eval mode on the CPU.
    """
    state = load_official_state_dict(path, keep_aux=aux_heads)
    model = DSNet(get_variant(variant), num_classes, aux_heads=aux_heads)
    check_state_dict(state, model, source=str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()

"""Convert local HF ``transformers`` checkpoints into this project's format.

One module per checkpoint family (nothing is downloaded; ``transformers`` is only used, when
installed, to save the exact tokenizer it runs: :mod:`.hf_checkpoint`);
a new family is one new module defining ``FAMILY`` plus one line in :data:`FAMILIES`.
Output directory: ``config.json`` (our :class:`BlueLMVConfig`), ``model.safetensors`` and
the tokenizer files, ready for ``bluelm-ros vlm-export``.

CLI: ``bluelm-ros vlm-convert FAMILY HF_DIR OUT_DIR`` (or ``python -m`` this package).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bluelm_ros.runtime.vlm.config import ConfigError
from bluelm_ros.tools.vlm.convert.common import ConversionError, convert as convert_family

# family name -> module defining FAMILY (a common.Family)
FAMILIES = {
    'llava': 'bluelm_ros.tools.vlm.convert.llava',
    'idefics3': 'bluelm_ros.tools.vlm.convert.idefics3',
}


def family(name: str):
    """Return the :class:`~bluelm_ros.tools.vlm.convert.common.Family` called ``name``."""
    if name not in FAMILIES:
        raise ConversionError(f'unknown checkpoint family {name!r}; known: '
                              f'{", ".join(FAMILIES)}')
    return importlib.import_module(FAMILIES[name]).FAMILY


def convert(name: str, hf_dir: str, out_dir: str, dtype=None, require_tokenizer: bool = True):
    """Convert a local checkpoint of family ``name``; return the config written."""
    return convert_family(family(name), hf_dir, out_dir, dtype, require_tokenizer)


def main(argv=None) -> int:
    """Command line entry point."""
    import torch
    families = '; '.join(f'{n}: {family(n).description}' for n in FAMILIES)
    ap = argparse.ArgumentParser(prog='bluelm-ros vlm-convert',
                                 description=__doc__.split('\n')[0] + f' Families: {families}.')
    ap.add_argument('family', choices=list(FAMILIES))
    ap.add_argument('hf_dir')
    ap.add_argument('out_dir')
    ap.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), default=None)
    ap.add_argument('--no-tokenizer', action='store_true',
                    help='do not require tokenizer.json')
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    try:
        cfg = convert(a.family, a.hf_dir, a.out_dir, dtype, not a.no_tokenizer)
    except (ConversionError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {a.out_dir} ({cfg.name}, {cfg.tokens_per_tile} tokens/tile)')
    return 0

"""The bundle format, read and verified (no torch); its one owner.

A bundle (written by ``bluelm-ros vlm-export``, :mod:`bluelm_ros.tools.vlm.export`) is a
folder with ``manifest.json``, ``config.json``, tokenizer files, ``embed_tokens.npy`` and
ONNX graphs with their ``.data`` weight files. The manifest records the format version,
per file its size and sha256, and per graph the names of its inputs and outputs. This
module owns all of that: the exporter writes with the constants, :class:`VisionIO`,
:class:`DecoderIO` and :func:`write_manifest` below, the engine reads with the same ones,
so the two sides cannot drift apart. Manifests from before the I/O names were recorded
get the names those exports used (:meth:`DecoderIO.from_entry`).

A file that is missing, truncated, replaced or corrupt is refused with a
:class:`BundleError` naming the file and the fix, before ONNX Runtime ever parses it.
Hashing a 1.5 GB decoder takes a few seconds, so files are verified lazily, when a
component is first used (``Bundle.component_files``), and at most once per process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json
import os
from typing import Callable, Optional

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, CONFIG_FILE, ConfigError

FORMAT = 'bluelm-v-onnx'
FORMAT_VERSION = 1
MANIFEST_NAME = 'manifest.json'
EMBED_NAME = 'embed_tokens.npy'
VERIFY_MODES = ('sha256', 'size', 'none')
EXPORT_COMMAND = 'bluelm-ros vlm-export'
# The KV cache tensors of one decoder layer; the scales only with an int8 cache.
CACHE_KINDS = ('key', 'value')
INT8_CACHE_KINDS = CACHE_KINDS + ('key_scale', 'value_scale')


class BundleError(RuntimeError):
    """A bundle is incomplete, corrupt or of an unsupported format; names the file."""


def graph_file(component: str, key: str) -> str:
    """File name of a graph: ``vision_int8.onnx``, ``decoder_int4-b64.onnx``."""
    return f'{component}_{key}.onnx'


# ---------------------------------------------------------------------------
# graph I/O names


@dataclass(frozen=True)
class VisionIO:
    """Names of the vision graph: tiles ``[N, 3, S, S]`` -> ``[N, tokens, hidden]``."""

    pixel_values: str = 'pixel_values'
    image_embeds: str = 'image_embeds'

    def to_entry(self) -> dict:
        return asdict(self)

    @classmethod
    def from_entry(cls, entry: dict) -> 'VisionIO':
        return cls(**entry['io']) if 'io' in entry else cls()


@dataclass(frozen=True)
class CacheTensor:
    """One KV-cache tensor of a layer: read whole as ``past``, new tokens out as ``present``."""

    layer: int
    kind: str  # one of INT8_CACHE_KINDS
    past: str
    present: str


@dataclass(frozen=True)
class DecoderIO:
    """Names of the decoder graph (the graph contract is in tools/vlm/export.py).

    ``inputs_embeds [1, T, hidden]``, ``position_ids [1, T]``, ``attention_mask [1, C]`` and
    every ``cache[i].past [1, kv_heads, C, d]`` in; ``logits [1, 1, vocab]`` (last position)
    and every ``cache[i].present [1, kv_heads, T, d]`` (the new tokens only) out. A ``gqa``
    decoder (tools/vlm/export_gqa.py) takes ``seqlens_k`` and ``total_sequence_length``
    instead of positions and mask, and its past and present are one shared buffer.
    """

    inputs_embeds: str = 'inputs_embeds'
    position_ids: str = 'position_ids'        # kv_buffer decoders
    attention_mask: str = 'attention_mask'    # kv_buffer decoders
    seqlens_k: str = 'seqlens_k'              # gqa decoders
    total_sequence_length: str = 'total_sequence_length'  # gqa decoders
    logits: str = 'logits'
    cache: tuple = ()

    @classmethod
    def for_layers(cls, num_layers: int, kv_dtype: str = 'float32') -> 'DecoderIO':
        """Return the names an export of ``num_layers`` layers with this KV dtype uses."""
        kinds = INT8_CACHE_KINDS if kv_dtype == 'int8' else CACHE_KINDS
        return cls(cache=tuple(
            CacheTensor(i, k, f'past_key_values.{i}.{k}', f'present.{i}.{k}')
            for i in range(num_layers) for k in kinds))

    def layer(self, index: int) -> list:
        """Return the cache tensors of one layer."""
        return [t for t in self.cache if t.layer == index]

    def to_entry(self) -> dict:
        return asdict(self)

    @classmethod
    def from_entry(cls, entry: dict) -> 'DecoderIO':
        """Read a decoder's manifest entry; entries without ``io`` get the old names."""
        io = entry.get('io')
        if io is None:
            return cls.for_layers(int(entry['num_layers']), entry.get('kv_dtype', 'float32'))
        cache = tuple(CacheTensor(**t) for t in io['cache'])
        return cls(**{**io, 'cache': cache})


# ---------------------------------------------------------------------------
# hashes and the manifest


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: str, fields: dict,
                   progress: Callable = lambda names: names) -> dict:
    """Hash every file of the bundle folder and write ``manifest.json``; return it.

    ``fields``: what the exporter records (model, components, options, ...); the format,
    its version and the file hashes are added here. ``progress`` wraps the file list (a
    progress bar while a large decoder is hashed).
    """
    names = sorted(f for f in os.listdir(out_dir)
                   if f != MANIFEST_NAME and os.path.isfile(os.path.join(out_dir, f)))
    files = {}
    for name in progress(names):
        path = os.path.join(out_dir, name)
        files[name] = {'sha256': sha256_file(path), 'bytes': os.path.getsize(path)}
    manifest = {'format': FORMAT, 'format_version': FORMAT_VERSION, **fields, 'files': files}
    with open(os.path.join(out_dir, MANIFEST_NAME), 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2)
        f.write('\n')
    return manifest


# ---------------------------------------------------------------------------
# reading


class Bundle:
    """An exported bundle folder: manifest, config and verified file paths.

    ``verify``: ``"sha256"`` (default; size and content), ``"size"`` (fast, catches
    truncation only) or ``"none"``.
    """

    def __init__(self, path: str, verify: str = 'sha256'):
        if verify not in VERIFY_MODES:
            raise ValueError(f'verify must be one of {VERIFY_MODES}')
        self.path = os.path.abspath(path)
        self.verify_mode = verify
        self._verified = set()
        if not os.path.isdir(self.path):
            raise BundleError(f'{self.path}: bundle folder not found. Export one with '
                              f'`{EXPORT_COMMAND} MODEL_DIR {path}`.')
        mpath = os.path.join(self.path, MANIFEST_NAME)
        if not os.path.exists(mpath):
            raise BundleError(f'{mpath}: manifest not found, so this is not an exported '
                              f'bundle (or the export did not finish). Re-run '
                              f'`{EXPORT_COMMAND}`.')
        try:
            with open(mpath, encoding='utf-8') as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f'{mpath}: unreadable manifest ({e}). Re-export the bundle.') \
                from None
        if self.manifest.get('format') != FORMAT:
            raise BundleError(f'{mpath}: format {self.manifest.get("format")!r} is not '
                              f'{FORMAT!r}. Point to a folder written by `{EXPORT_COMMAND}`.')
        version = self.manifest.get('format_version')
        if version != FORMAT_VERSION:
            raise BundleError(f'{mpath}: format_version {version} is not supported by this '
                              f'runtime (expects {FORMAT_VERSION}). Re-export the bundle with '
                              f'this version of bluelm_ros.')
        self.files = self.manifest.get('files', {})
        self.components = self.manifest.get('components', {})
        self.verify([CONFIG_FILE])
        try:
            self.config = BlueLMVConfig.from_json(self.file(CONFIG_FILE))
        except ConfigError as e:
            raise BundleError(f'{e}. Re-export the bundle.') from None

    # -- files ---------------------------------------------------------------------

    def file(self, name: str) -> str:
        """Return where a bundle file lives (the path is not verified)."""
        return os.path.join(self.path, name)

    def verify(self, names: Optional[list] = None) -> None:
        """Check files (default: all) against the manifest; raise BundleError."""
        names = list(self.files) if names is None else names
        for name in names:
            if name in self._verified:
                continue
            path = self.file(name)
            entry = self.files.get(name)
            if entry is None:
                raise BundleError(f'{path}: not listed in {MANIFEST_NAME}; the manifest does '
                                  f'not match the files. Re-export the bundle.')
            if not os.path.exists(path):
                raise BundleError(f'{path}: file missing from the bundle. Copy the complete '
                                  f'bundle folder again or re-export it with '
                                  f'`{EXPORT_COMMAND}`.')
            if self.verify_mode != 'none':
                size = os.path.getsize(path)
                if size != entry['bytes']:
                    raise BundleError(
                        f'{path}: size {size} bytes, manifest says {entry["bytes"]}: the file '
                        f'is truncated or was replaced. Copy the bundle again or re-export it.')
            if self.verify_mode == 'sha256':
                digest = sha256_file(path)
                if digest != entry['sha256']:
                    raise BundleError(
                        f'{path}: sha256 mismatch (manifest {entry["sha256"][:16]}..., file '
                        f'{digest[:16]}...): the file is corrupt or was modified. Copy the '
                        f'bundle again or re-export it with `{EXPORT_COMMAND}`.')
            self._verified.add(name)

    # -- components ---------------------------------------------------------------------

    def precisions(self, component: str) -> list:
        """Precisions exported for ``vision`` or ``decoder``."""
        return list(self.components.get(component, {}))

    def entry(self, component: str, precision: Optional[str] = None) -> dict:
        """Manifest entry of a component (``precision`` for vision/decoder)."""
        comp = self.components.get(component)
        if comp is None:
            raise BundleError(f'{self.file(MANIFEST_NAME)}: the bundle has no {component}. '
                              f'Re-export it with that part.')
        if precision is None:
            return comp
        if precision not in comp:
            raise BundleError(f'{self.file(MANIFEST_NAME)}: no {precision} {component} in '
                              f'this bundle (has {sorted(comp)}). Choose one of those or '
                              f're-export with `--{component} {precision}`.')
        return comp[precision]

    def component_files(self, component: str, precision: Optional[str] = None) -> list:
        """Verify a component's files and return their paths (main file first)."""
        files = self.entry(component, precision)['files']
        self.verify(files)
        return [self.file(f) for f in files]

    def decoder_attention(self, precision: str) -> str:
        """Attention layout of a decoder: ``kv_buffer`` (also every older export) or ``gqa``."""
        return self.entry('decoder', precision).get('attention', 'kv_buffer')

    def vision_io(self, precision: str) -> VisionIO:
        """Input/output names of a vision graph."""
        return VisionIO.from_entry(self.entry('vision', precision))

    def decoder_io(self, precision: str) -> DecoderIO:
        """Input/output names of a decoder graph."""
        return DecoderIO.from_entry(self.entry('decoder', precision))

    def describe(self) -> dict:
        """Sizes in MiB per component and precision (for logs and benchmarks)."""
        out = {}
        for comp, entries in self.components.items():
            if 'files' in entries:
                out[comp] = sum(self.files[f]['bytes'] for f in entries['files']) / 2 ** 20
                continue
            for prec, e in entries.items():
                out[f'{comp}_{prec}'] = sum(self.files[f]['bytes'] for f in e['files']) / 2 ** 20
        return out

"""Load and verify an exported BlueLM-V ONNX bundle (no torch).

A bundle (written by :mod:`bluelm_ros.vlm.export`) is a folder with ``manifest.json``,
``config.json``, tokenizer files, ``embed_tokens.npy`` and ONNX graphs with their
``.data`` weight files. The manifest records the format version and, per file, its size
and sha256. A file that is missing, truncated, replaced or corrupt is refused with a
:class:`BundleError` naming the file and the fix, before ONNX Runtime ever parses it.

Hashing a 1.5 GB decoder takes a few seconds, so files are verified lazily, when a
component is first used (``Bundle.component_files``), and at most once per process.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from .config import BlueLMVConfig, ConfigError

FORMAT = 'bluelm-v-onnx'
FORMAT_VERSION = 1
MANIFEST_NAME = 'manifest.json'
VERIFY_MODES = ('sha256', 'size', 'none')
_REEXPORT = 'python -m bluelm_ros.vlm.export'


class BundleError(RuntimeError):
    """A bundle is incomplete, corrupt or of an unsupported format; names the file."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


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
                              f'`{_REEXPORT} MODEL_DIR {path}`.')
        mpath = os.path.join(self.path, MANIFEST_NAME)
        if not os.path.exists(mpath):
            raise BundleError(f'{mpath}: manifest not found, so this is not an exported '
                              f'bundle (or the export did not finish). Re-run `{_REEXPORT}`.')
        try:
            with open(mpath, encoding='utf-8') as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f'{mpath}: unreadable manifest ({e}). Re-export the bundle.') \
                from None
        if self.manifest.get('format') != FORMAT:
            raise BundleError(f'{mpath}: format {self.manifest.get("format")!r} is not '
                              f'{FORMAT!r}. Point to a folder written by `{_REEXPORT}`.')
        version = self.manifest.get('format_version')
        if version != FORMAT_VERSION:
            raise BundleError(f'{mpath}: format_version {version} is not supported by this '
                              f'runtime (expects {FORMAT_VERSION}). Re-export the bundle with '
                              f'this version of bluelm_ros.')
        self.files = self.manifest.get('files', {})
        self.components = self.manifest.get('components', {})
        self.verify(['config.json'])
        try:
            self.config = BlueLMVConfig.from_json(self.file('config.json'))
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
                                  f'bundle folder again or re-export it with `{_REEXPORT}`.')
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
                        f'bundle again or re-export it with `{_REEXPORT}`.')
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

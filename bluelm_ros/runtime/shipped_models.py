"""Where the shipped models live, and how a model parameter value becomes a path.

One resolver for every model setting (the nodes' ``model_path`` and ``bundle_path``, the
benchmarks, the tests): an empty value is the shipped default; a relative path that does
not exist from the working directory is looked up among the shipped models.
"""
from dataclasses import dataclass
import os

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'models')


@dataclass(frozen=True)
class ShippedModel:
    """A kind of shipped model: its folder under MODELS_DIR and the default in it."""

    folder: str
    default: str
    marker: str = ''  # file inside the default that proves it is installed ('' = itself)

    @property
    def default_path(self):
        return os.path.join(MODELS_DIR, self.folder, self.default)

    def available(self):
        """Tell whether the default is installed in this copy of bluelm_ros."""
        path = self.default_path
        return os.path.exists(os.path.join(path, self.marker) if self.marker else path)


DSNET = ShippedModel('dsnet', 'dsnet_tiny_synthetic_480x640_int8.onnx')
VLM_BUNDLE = ShippedModel('vlm', 'scene-tiny', marker='manifest.json')


def resolve(value, kind):
    """Return the path for a model setting of ``kind`` (DSNET or VLM_BUNDLE).

    '' -> the shipped default. '~' is expanded. A relative path that does not exist from
    the working directory is tried under models/<kind folder>/, then under models/ (so
    'scene-tiny', 'dsnet_tiny_synthetic_480x640_fp32.onnx' and
    'dsnet/dsnet_tiny_synthetic_480x640_fp32.onnx' all pick shipped files); a path found
    nowhere is returned as given, for the caller's "not found" error.
    """
    if not value:
        return kind.default_path
    path = os.path.expanduser(value)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for base in (os.path.join(MODELS_DIR, kind.folder), MODELS_DIR):
        shipped = os.path.join(base, path)
        if os.path.exists(shipped):
            return shipped
    return path

"""One resolver for every model setting: '' = shipped default, relative = shipped file."""
import os

from bluelm_ros.runtime import shipped_models
from bluelm_ros.runtime.shipped_models import DSNET, MODELS_DIR, resolve, VLM_BUNDLE


def test_empty_is_the_shipped_default():
    assert resolve('', DSNET) == os.path.join(MODELS_DIR, 'dsnet',
                                              'dsnet_tiny_synthetic_480x640_int8.onnx')
    assert resolve('', VLM_BUNDLE).endswith(os.path.join('models', 'vlm', 'scene-tiny'))
    assert DSNET.available() and os.path.isfile(DSNET.default_path)


def test_relative_names_find_shipped_files_and_other_paths_pass_through(tmp_path,
                                                                        monkeypatch):
    fp32 = os.path.join(MODELS_DIR, 'dsnet', 'dsnet_tiny_synthetic_480x640_fp32.onnx')
    assert resolve('dsnet_tiny_synthetic_480x640_fp32.onnx', DSNET) == fp32
    assert resolve('dsnet/dsnet_tiny_synthetic_480x640_fp32.onnx', DSNET) == fp32
    assert resolve('/abs/bundle', VLM_BUNDLE) == '/abs/bundle'
    assert resolve('~/b', VLM_BUNDLE) == os.path.expanduser('~/b')
    assert resolve('no_such_model.onnx', DSNET) == 'no_such_model.onnx'
    # A file in the working directory wins over a shipped one of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'dsnet_tiny_synthetic_480x640_fp32.onnx').write_bytes(b'')
    assert resolve('dsnet_tiny_synthetic_480x640_fp32.onnx', DSNET) == \
        'dsnet_tiny_synthetic_480x640_fp32.onnx'
    assert shipped_models.VLM_BUNDLE.marker == 'manifest.json'

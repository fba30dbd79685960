"""ONNX Runtime session creation shared by the segmenter and the VLM engine.

Providers are tried in the order given; unavailable ones fall back to CPU with a warning
(a robot built with a different ORT package should still start). Missing or corrupt model
files raise ModelFileError naming the file and the fix.
"""
import logging
import os

import onnxruntime as ort

log = logging.getLogger(__name__)


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable or not what the caller expects."""


def session_options(threads=0, spinning=False, arena=True, optimization='all'):
    """Build SessionOptions.

    threads: intra-op threads (0 = ORT default, all cores). spinning: keep worker threads
    spinning between runs (faster back-to-back runs, but steals cores from other work such
    as a second model in the same process). arena: memory arena (off cuts RSS for
    variable shapes).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        'none': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = bool(arena)
    so.add_session_config_entry('session.intra_op.allow_spinning', '1' if spinning else '0')
    so.log_severity_level = 3
    return so


def resolve_providers(requested):
    """Return (providers to use, warnings) keeping the requested order, CPU always last."""
    available = ort.get_available_providers()
    chosen, warnings = [], []
    for p in requested or ['CPUExecutionProvider']:
        if p in available:
            if p not in chosen:
                chosen.append(p)
        else:
            warnings.append(f'ONNX Runtime provider {p} is not available in this build '
                            f'(available: {", ".join(available)}); falling back')
    if 'CPUExecutionProvider' not in chosen:
        chosen.append('CPUExecutionProvider')
    return chosen, warnings


def create_session(path, providers=None, fix_hint='', **options):
    """Open an InferenceSession, with errors that name the file and the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f'model file not found: {path}. {fix_hint}'.strip())
    chosen, warnings = resolve_providers(providers)
    for w in warnings:
        log.warning(w)
    try:
        sess = ort.InferenceSession(path, sess_options=session_options(**options),
                                    providers=chosen)
    except Exception as exc:  # ORT raises several types for bad files
        raise ModelFileError(f'cannot load ONNX model {path}: {exc}. The file is corrupt or '
                             f'not an ONNX model. {fix_hint}'.strip()) from exc
    return sess, warnings


def metadata(session):
    """Return the custom metadata map of a session (str -> str)."""
    return dict(session.get_modelmeta().custom_metadata_map)

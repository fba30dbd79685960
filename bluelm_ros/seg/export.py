"""DSNet -> ONNX (static shape, FP32) and INT8 static QDQ quantization.

torch is needed here (export), never at run time. Each exported file carries its variant,
class count, input size and label set in the ONNX metadata so the runtime can refuse a
model that does not match its labels. The graph has two outputs: `logits` and `mask`
(ArgMax over classes, uint8/uint16), so the runtime can fetch only the small mask.
"""
import os
import tempfile

import numpy as np
import onnx

from bluelm_ros.seg.labels import get_label_set
from bluelm_ros.seg.segmenter import IMAGENET_MEAN, IMAGENET_STD, normalize

FORMAT_VERSION = '1'


class _WithMask:
    """Build the torch wrapper lazily so importing this module does not need torch."""

    @staticmethod
    def wrap(model, num_classes):
        import torch

        class WithMask(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                logits = self.net(x)
                dtype = torch.uint8 if num_classes <= 256 else torch.int32
                return logits, logits.argmax(1).to(dtype)
        return WithMask(model).eval()


def export_onnx(model, path, variant, num_classes, height, width, label_set='cityscapes',
                class_names=None, dynamic=False, opset=18):
    """Export an eval-mode DSNet at a static HxW; write metadata; return the path.

    dynamic=True is refused: a dynamic-H/W export runs but is silently wrong at other sizes
    (the MSAF adaptive pooling kernels are frozen at trace time). Export one per size.
    """
    import torch
    if dynamic:
        raise ValueError('dynamic H/W DSNet export is refused: the MSAF adaptive pools are '
                         'frozen at trace time, so other sizes give silently wrong masks. '
                         'Export one static model per input resolution.')
    if height % 8 or width % 8:
        raise ValueError(f'input size {height}x{width} must be a multiple of 8 (1/8 stride)')
    labels = get_label_set(label_set, num_classes, class_names)
    wrapped = _WithMask.wrap(model.eval(), num_classes)
    x = torch.zeros(1, 3, int(height), int(width))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        prog = torch.onnx.export(wrapped, (x,), dynamo=True, opset_version=opset,
                                 input_names=['image'], output_names=['logits', 'mask'],
                                 verbose=False)
    prog.save(path)
    m = onnx.load(path)
    if num_classes > 256:  # torch has no uint16 argmax output: cast in the graph
        _retype_mask_uint16(m)
    write_metadata(m, {
        'bluelm_ros.kind': 'dsnet', 'bluelm_ros.format': FORMAT_VERSION,
        'dsnet.variant': getattr(variant, 'name', variant), 'dsnet.num_classes': num_classes,
        'dsnet.input_height': height, 'dsnet.input_width': width,
        'dsnet.label_set': labels.name, 'dsnet.precision': 'fp32',
        'dsnet.class_names': '|'.join(labels.names),
        'dsnet.mean': ','.join(map(str, IMAGENET_MEAN)),
        'dsnet.std': ','.join(map(str, IMAGENET_STD)),
    })
    onnx.save(m, path)
    return path


def _retype_mask_uint16(m):
    from onnx import helper, TensorProto
    out = next(o for o in m.graph.output if o.name == 'mask')
    producer = next(n for n in m.graph.node if 'mask' in n.output)
    producer.output[list(producer.output).index('mask')] = 'mask_i32'
    m.graph.node.append(helper.make_node('Cast', ['mask_i32'], ['mask'],
                                         to=TensorProto.UINT16))
    out.type.tensor_type.elem_type = TensorProto.UINT16


def write_metadata(model, values):
    """Set (replace) string metadata props on an onnx.ModelProto."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in values.items():
        model.metadata_props.add(key=k, value=str(v))


def read_metadata(path_or_model):
    m = onnx.load(path_or_model, load_external_data=False) \
        if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    return {p.key: p.value for p in m.metadata_props}


class _CalibrationReader:
    """Feed preprocessed calibration images to the ORT static quantizer."""

    def __init__(self, images, size, input_name='image'):
        self.batches = iter([{input_name: normalize(img, size)} for img in images])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32_path, out_path, calibration_images, per_channel=True):
    """Quantize to static QDQ INT8: U8 activations, S8 per-channel weights, MinMax calib.

    calibration_images: iterable of RGB uint8 images (any size; resized like at run time).
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    meta = read_metadata(fp32_path)
    size = (int(meta['dsnet.input_height']), int(meta['dsnet.input_width']))
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, 'pre.onnx')
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        quantize_static(
            pre, out_path, _CalibrationReader(list(calibration_images), size),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Keep the output head (ArgMax and its input) in float: it is cheap and
            # quantizing the logits would only add argmax ties.
            nodes_to_exclude=_argmax_nodes(pre),
            extra_options={'ActivationSymmetric': False, 'WeightSymmetric': True})
    m = onnx.load(out_path)
    meta['dsnet.precision'] = 'int8'
    write_metadata(m, meta)
    onnx.save(m, out_path)
    return out_path


def _argmax_nodes(path):
    m = onnx.load(path)
    return [n.name for n in m.graph.node if n.op_type in ('ArgMax', 'Cast')]


def parity(fp32_session_model, torch_model, images):
    """Return (argmax agreement, max |logit diff|) of an ONNX model vs torch on images."""
    import torch
    from bluelm_ros.seg.segmenter import Segmenter
    seg = fp32_session_model if isinstance(fp32_session_model, Segmenter) \
        else Segmenter(fp32_session_model)
    agree, diff = [], 0.0
    for img in images:
        x = normalize(img, seg.input_size)
        ort_logits = seg.session.run(['logits'], {seg.input_name: x})[0]
        with torch.no_grad():
            ref = torch_model.eval()(torch.from_numpy(x)).numpy()
        agree.append(float((ort_logits.argmax(1) == ref.argmax(1)).mean()))
        diff = max(diff, float(np.abs(ort_logits - ref).max()))
    return float(np.mean(agree)), diff

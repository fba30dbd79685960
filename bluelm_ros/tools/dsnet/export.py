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

from bluelm_ros.runtime.labels import get_label_set
from bluelm_ros.runtime.segmenter import IMAGENET_MEAN, IMAGENET_STD, normalize

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
    from bluelm_ros.runtime.segmenter import Segmenter
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


def calibration_images(folder=None, count=64, size=(480, 640)):
    """Return calibration RGB images from a folder, or synthetic street scenes."""
    import glob

    import cv2
    if folder:
        paths = sorted(p for ext in ('png', 'jpg', 'jpeg')
                       for p in glob.glob(os.path.join(folder, f'*.{ext}')))[:count]
        if not paths:
            raise FileNotFoundError(f'no .png/.jpg calibration images in {folder}')
        return [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    from bluelm_ros.data.datasets import SyntheticStreetDataset
    data = SyntheticStreetDataset(count, size[0], size[1], offset=2 * 10 ** 6)
    return [data[i][0] for i in range(count)]


def add_arguments(p):
    p.add_argument('checkpoint', help='official DSNet checkpoint (.pth / .pth.tar, keys model.*)')
    p.add_argument('--variant', help='dsnet_head64|dsnet_head128|dsnet_head256|m|dsnet_tiny '
                   '(default: inferred from the weights)')
    p.add_argument('--num-classes', type=int, help='default: inferred from the weights')
    p.add_argument('--height', type=int, default=480, help='static input height (x8)')
    p.add_argument('--width', type=int, default=640, help='static input width (x8)')
    p.add_argument('--label-set', help='cityscapes, ade20k or a custom name '
                   '(default: by class count, 19 -> cityscapes, 150 -> ade20k)')
    p.add_argument('--class-names', help='comma-separated names for a custom label set')
    p.add_argument('--out', required=True, help='output .onnx (FP32)')
    p.add_argument('--int8', action='store_true', help='also write <out>_int8.onnx')
    p.add_argument('--calib-dir', help='calibration images (default: synthetic scenes)')
    p.add_argument('--calib-count', type=int, default=64)
    # Kept so the refusal is explained rather than an 'unrecognized argument' error.
    p.add_argument('--dynamic', action='store_true', help='refused: see docs')


def run(args):
    from bluelm_ros.tools.dsnet.checkpoint import (infer_variant, load_dsnet,
                                                   load_official_state_dict)
    variant, num_classes = args.variant, args.num_classes
    if not variant or not num_classes:
        guess_variant, guess_classes = infer_variant(load_official_state_dict(args.checkpoint))
        variant, num_classes = variant or guess_variant, num_classes or guess_classes
    label_set = args.label_set or {19: 'cityscapes', 150: 'ade20k'}.get(num_classes, 'custom')
    names = args.class_names.split(',') if args.class_names else None
    model = load_dsnet(args.checkpoint, variant, num_classes)
    print(f'loaded {args.checkpoint}: variant {variant}, {num_classes} classes, '
          f'label set {label_set}')
    export_onnx(model, args.out, variant, num_classes, args.height, args.width, label_set,
                names, dynamic=args.dynamic)
    images = calibration_images(args.calib_dir, args.calib_count, (args.height, args.width))
    agree, diff = parity(args.out, model, images[:3])
    print(f'wrote {args.out}: ONNX Runtime vs PyTorch argmax agreement {100 * agree:.3f}%, '
          f'max |logit diff| {diff:.2e}')
    if args.int8:
        out8 = os.path.splitext(args.out)[0] + '_int8.onnx'
        quantize_int8(args.out, out8, images)
        from bluelm_ros.tools.dsnet.metrics import agreement
        from bluelm_ros.runtime.segmenter import Segmenter
        a, b = Segmenter(args.out), Segmenter(out8)
        agree8 = np.mean([agreement(a(img), b(img)) for img in images[:8]])
        print(f'wrote {out8}: INT8 vs FP32 pixel agreement {100 * agree8:.2f}%')
    return 0

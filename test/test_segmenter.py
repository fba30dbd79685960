"""DSNet runtime, export, INT8, datasets and metrics, on the shipped model and real ORT."""
import os

import cv2
import numpy as np
import pytest

from bluelm_ros.data.datasets import ADE20KDataset, CityscapesDataset, SyntheticStreetDataset
from bluelm_ros.data.synthetic import render_scene
from bluelm_ros.runtime import shipped_models
from bluelm_ros.runtime.image import ImageError
from bluelm_ros.runtime.labels import get_label_set
from bluelm_ros.runtime.ort_session import ModelFileError
from bluelm_ros.runtime.segmenter import Segmenter
from bluelm_ros.tools.dsnet import metrics

MODELS = os.path.join(shipped_models.MODELS_DIR, 'dsnet')
FP32 = os.path.join(MODELS, 'dsnet_tiny_synthetic_480x640_fp32.onnx')
INT8 = os.path.join(MODELS, 'dsnet_tiny_synthetic_480x640_int8.onnx')
CKPT = os.path.join(MODELS, 'dsnet_tiny_synthetic.pth.tar')
VAL = SyntheticStreetDataset(12, offset=10 ** 6)


@pytest.fixture(scope='module')
def fp32():
    return Segmenter(FP32, threads=2)


@pytest.fixture(scope='module')
def int8():
    return Segmenter(INT8, threads=2)


def test_shipped_models_carry_their_identity(fp32, int8):
    for seg, precision in ((fp32, 'fp32'), (int8, 'int8')):
        assert seg.variant == 'dsnet_tiny' and seg.num_classes == 19
        assert seg.input_size == (480, 640) and seg.precision == precision
        assert seg.labels.name == 'cityscapes' and seg.labels.names[13] == 'car'


def test_onnx_matches_pytorch_on_the_shipped_weights(fp32):
    torch = pytest.importorskip('torch')
    from bluelm_ros.tools.dsnet.checkpoint import load_dsnet
    from bluelm_ros.tools.dsnet.export import parity
    torch.set_num_threads(2)
    model = load_dsnet(CKPT, 'dsnet_tiny', 19)
    agree, diff = parity(fp32, model, [VAL[i][0] for i in range(2)])
    assert agree == 1.0
    assert diff < 1e-3


def test_shipped_model_segments_held_out_scenes(fp32, int8):
    conf32 = np.zeros((19, 19), np.int64)
    conf8 = np.zeros((19, 19), np.int64)
    agree = []
    for i in range(len(VAL)):
        img, lab = VAL[i]
        m32, m8 = fp32(img), int8(img)
        conf32 += metrics.confusion_matrix(m32, lab, 19)
        conf8 += metrics.confusion_matrix(m8, lab, 19)
        agree.append(metrics.agreement(m32, m8))
    assert metrics.mean_iou(conf32) > 0.90
    assert metrics.mean_iou(conf8) > metrics.mean_iou(conf32) - 0.01
    assert np.mean(agree) >= 0.98


def test_any_input_layout_gives_a_mask_at_input_size(fp32):
    scene = render_scene(3, 240, 320)
    rgb = scene.image
    ref = fp32(rgb)
    assert ref.shape == (240, 320) and ref.dtype == np.uint8
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert (fp32(bgr, color_order='bgr') == ref).all()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert (fp32(rgba) == ref).all()
    rgb16 = rgb.astype(np.uint16) << 8
    assert (fp32(rgb16) == ref).all()
    mono = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert fp32(mono).shape == (240, 320)
    assert fp32(mono.astype(np.uint16) * 257).shape == (240, 320)
    assert fp32(render_scene(4, 97, 1001).image).shape == (97, 1001)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((0, 10, 3), np.uint8), 'empty'),
    (np.zeros((10, 10, 2), np.uint8), 'shape'),
    (np.zeros((10, 10, 3), np.float32), 'uint8 or uint16'),
    (np.zeros((2, 10, 10, 3), np.uint8), 'shape'),
    ([[1, 2], [3, 4]], 'numpy array'),
])
def test_bad_images_get_clear_errors(fp32, bad, match):
    with pytest.raises(ImageError, match=match):
        fp32(bad)
    with pytest.raises(ImageError, match='color_order'):
        fp32(np.zeros((8, 8, 3), np.uint8), color_order='yuv')


def test_missing_corrupt_and_foreign_model_files_name_the_file_and_fix(tmp_path):
    missing = tmp_path / 'nope.onnx'
    with pytest.raises(ModelFileError, match=f'{missing}.*dsnet-export'):
        Segmenter(missing)
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(open(FP32, 'rb').read()[:5000])
    with pytest.raises(ModelFileError, match=f'{corrupt}.*corrupt'):
        Segmenter(corrupt)
    import onnx
    from onnx import helper, TensorProto
    graph = helper.make_graph(
        [helper.make_node('Identity', ['image'], ['logits'])], 'g',
        [helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, [1, 3, 8, 8])])
    foreign = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    foreign.ir_version = 10
    onnx.save(foreign, tmp_path / 'foreign.onnx')
    with pytest.raises(ModelFileError, match='not a bluelm_ros DSNet export'):
        Segmenter(tmp_path / 'foreign.onnx')


def test_label_set_must_match_the_model_head():
    with pytest.raises(ModelFileError, match='150 classes but the model predicts 19'):
        Segmenter(FP32, label_set='ade20k')


def test_unavailable_provider_falls_back_to_cpu_with_a_warning():
    seg = Segmenter(INT8, providers=['NoSuchExecutionProvider', 'CPUExecutionProvider'])
    assert seg.providers == ['CPUExecutionProvider']
    assert any('NoSuchExecutionProvider' in w for w in seg.provider_warnings)


def test_export_cli_turns_an_official_checkpoint_into_a_segmenter(tmp_path, capsys):
    pytest.importorskip('torch')
    from bluelm_ros.cli import main
    out = tmp_path / 'tiny.onnx'
    rc = main(['dsnet-export', CKPT, '--height', '96', '--width', '128', '--out', str(out),
               '--int8', '--calib-count', '8'])
    assert rc == 0
    text = capsys.readouterr().out
    assert 'variant dsnet_tiny, 19 classes' in text and 'agreement 100.000%' in text
    for path in (out, tmp_path / 'tiny_int8.onnx'):
        seg = Segmenter(path)
        assert seg.input_size == (96, 128) and seg.variant == 'dsnet_tiny'
    with pytest.raises(ValueError, match='dynamic H/W DSNet export is refused'):
        main(['dsnet-export', CKPT, '--out', str(tmp_path / 'dyn.onnx'), '--dynamic'])


def test_synthetic_scenes_are_deterministic_and_labelled():
    a, b = render_scene(42), render_scene(42)
    assert (a.image == b.image).all() and (a.mask == b.mask).all()
    assert not (render_scene(43).image == a.image).all()
    assert set(np.unique(a.mask)) <= {0, 1, 2, 5, 7, 8, 9, 10, 11, 13, 15}
    for obj in a.objects:
        cls = {'car': 13, 'bus': 15, 'person': 11}[obj.kind]
        x0, y0, x1, y1 = obj.box
        assert (a.mask[y0:y1, x0:x1] == cls).any()


def test_dataset_readers_map_official_label_ids(tmp_path):
    city = tmp_path / 'cityscapes'
    (city / 'leftImg8bit' / 'val' / 'aachen').mkdir(parents=True)
    (city / 'gtFine' / 'val' / 'aachen').mkdir(parents=True)
    cv2.imwrite(str(city / 'leftImg8bit/val/aachen/a_000_leftImg8bit.png'),
                np.zeros((4, 4, 3), np.uint8))
    ids = np.array([[7, 8, 26, 0]] * 4, np.uint8)  # road, sidewalk, car, unlabeled
    cv2.imwrite(str(city / 'gtFine/val/aachen/a_000_gtFine_labelIds.png'), ids)
    _, lab = CityscapesDataset(str(city), 'val')[0]
    assert lab[0].tolist() == [0, 1, 13, 255]
    ade = tmp_path / 'ade'
    (ade / 'images' / 'validation').mkdir(parents=True)
    (ade / 'annotations' / 'validation').mkdir(parents=True)
    cv2.imwrite(str(ade / 'images/validation/x.jpg'), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(ade / 'annotations/validation/x.png'),
                np.array([[0, 1, 150, 3]] * 4, np.uint8))
    _, lab = ADE20KDataset(str(ade))[0]
    assert lab[0].tolist() == [255, 0, 149, 2]
    with pytest.raises(FileNotFoundError, match='no Cityscapes images'):
        CityscapesDataset(str(tmp_path / 'empty'))


def test_metrics_on_a_hand_computed_case():
    target = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    conf = metrics.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = metrics.iou_per_class(conf)
    # class 0: tp 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 0 / 1
    assert np.allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert metrics.mean_iou(conf) == pytest.approx(1 / 3)


def test_label_sets():
    assert get_label_set('ade20k').num_classes == 150
    custom = get_label_set('mine', names=['floor', 'obstacle'])
    assert custom.palette().shape[0] >= 256 and custom.names == ('floor', 'obstacle')
    with pytest.raises(ValueError, match='needs names'):
        get_label_set('mine')

"""Tests for bluelm_ros.ros.image_codec: raw/compressed image messages <-> numpy."""
import array
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from bluelm_ros.ros import image_codec
from bluelm_ros.ros.image_codec import (bytes_per_pixel, compressed_to_numpy, encode_compressed,
                                        image_to_numpy, numpy_to_image, SUPPORTED_ENCODINGS)
from bluelm_ros.runtime.image import ImageError

sensor_msgs = pytest.importorskip('sensor_msgs.msg')

# encoding -> (channels, dtype, color order) for every non-YUV encoding.
RAW = {
    'rgb8': (3, np.uint8, 'rgb'), 'bgr8': (3, np.uint8, 'bgr'),
    'rgba8': (4, np.uint8, 'rgb'), 'bgra8': (4, np.uint8, 'bgr'),
    'rgb16': (3, np.uint16, 'rgb'), 'bgr16': (3, np.uint16, 'bgr'),
    'rgba16': (4, np.uint16, 'rgb'), 'bgra16': (4, np.uint16, 'bgr'),
    'mono8': (1, np.uint8, 'rgb'), 'mono16': (1, np.uint16, 'rgb'),
    '8UC1': (1, np.uint8, 'rgb'), '16UC1': (1, np.uint16, 'rgb'),
    '8UC3': (3, np.uint8, 'bgr'), '8UC4': (4, np.uint8, 'bgr'),
}
YUV_UYVY = ('yuv422', 'uyvy', 'UYVY')
YUV_YUYV = ('yuv422_yuy2', 'yuyv', 'YUYV')
SIZES = [(1, 1), (2, 3), (7, 33), (480, 640), (5, 1279)]  # (h, w): odd widths included


def random_image(h, w, channels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)


def raw_msg(image, encoding, pad=0, bigendian=False, data_type=bytes, step=None):
    """Hand-build a duck-typed Image with ``pad`` garbage bytes at the end of each row."""
    h, w = image.shape[:2]
    row = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder('>' if bigendian else '<'))
    row = row.reshape(h, -1).view(np.uint8)
    padded = np.full((h, row.shape[1] + pad), 0xAB, np.uint8)
    padded[:, :row.shape[1]] = row
    data = padded.tobytes()
    if data_type is array.array:
        data = array.array('B', data)
    elif data_type is not bytes:
        data = data_type(data)
    return SimpleNamespace(
        height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
        step=row.shape[1] + pad if step is None else step, data=data)


def rgb_to_yuv422(rgb, order):
    """Pack RGB into UYVY/YUYV bytes by hand (BT.601 limited range, chroma of pixel pairs)."""
    f = rgb.astype(np.float64) / 255.0
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    u = (u[:, 0::2] + u[:, 1::2]) / 2
    v = (v[:, 0::2] + v[:, 1::2]) / 2
    h, w = y.shape
    out = np.empty((h, w // 2, 4))
    if order == 'uyvy':
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
    else:
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = y[:, 0::2], u, y[:, 1::2], v
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w, 2)


def pair_constant_rgb(h, w, seed=0):
    """Random colours, each horizontal pixel pair one colour, so 4:2:2 loses no chroma."""
    img = random_image(h, w // 2, 3, np.uint8, seed)
    # Stay inside the YUV gamut so clipping does not hide conversion errors.
    img = (img.astype(np.uint16) * 200 // 255 + 28).astype(np.uint8)
    return np.repeat(img, 2, axis=1)


def reason_of(excinfo):
    return excinfo.value.reason


# --- module surface ---------------------------------------------------------------------

def test_no_ros_import_at_module_level():
    code = ('import sys, bluelm_ros.ros.image_codec; '
            'assert "rclpy" not in sys.modules and "sensor_msgs" not in sys.modules')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_supported_encodings_and_bytes_per_pixel():
    for enc in list(RAW) + list(YUV_UYVY + YUV_YUYV):
        assert enc in SUPPORTED_ENCODINGS
    expect = {'rgb8': 3, 'bgra8': 4, 'mono8': 1, 'mono16': 2, '16UC1': 2, '8UC1': 1,
              '8UC3': 3, '8UC4': 4, 'rgb16': 6, 'yuv422': 2, 'YUYV': 2}
    for enc, bpp in expect.items():
        assert bytes_per_pixel(enc) == bpp
    assert bytes_per_pixel('RGB8') == 3  # drivers that upper-case encodings
    with pytest.raises(ImageError) as e:
        bytes_per_pixel('bayer_rggb8')
    assert reason_of(e) == 'unsupported_encoding'
    assert isinstance(e.value, ValueError)


# --- raw round trips --------------------------------------------------------------------

@pytest.mark.parametrize('encoding', list(RAW))
@pytest.mark.parametrize('h,w', SIZES)
def test_round_trip_through_real_message(encoding, h, w):
    channels, dtype, order = RAW[encoding]
    img = random_image(h, w, channels, dtype, seed=h * w)
    msg = numpy_to_image(img, encoding)
    assert isinstance(msg, sensor_msgs.Image)
    assert (msg.height, msg.width, msg.encoding) == (h, w, encoding)
    assert msg.step == w * bytes_per_pixel(encoding)
    assert msg.is_bigendian == 0
    assert len(msg.data) == msg.step * h
    out, color_order = image_to_numpy(msg)
    assert color_order == order
    assert out.dtype == dtype and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    # Decoding is a view of msg.data, not a copy.
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize('encoding', ['rgb8', 'bgra8', 'mono8', 'mono16', '16UC1', 'rgba16'])
@pytest.mark.parametrize('pad', [1, 3, 64])
@pytest.mark.parametrize('h,w', [(3, 5), (17, 31), (4, 640)])
def test_padded_step_is_sliced_without_copy(encoding, pad, h, w):
    channels, dtype, _ = RAW[encoding]
    img = random_image(h, w, channels, dtype, seed=pad)
    msg = raw_msg(img, encoding, pad=pad, data_type=array.array)
    out, _ = image_to_numpy(msg)
    np.testing.assert_array_equal(out, img)
    assert out.dtype == dtype
    if dtype == np.uint8 or pad % 2 == 0:
        assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))
    else:
        assert out.flags.aligned  # odd step: uint16 rows copied to aligned memory


@pytest.mark.parametrize('data_type', [bytes, bytearray, memoryview, array.array, list])
def test_data_container_types(data_type):
    img = random_image(4, 6, 3, np.uint8)
    out, order = image_to_numpy(raw_msg(img, 'rgb8', pad=2, data_type=data_type))
    assert order == 'rgb'
    np.testing.assert_array_equal(out, img)


def test_extra_trailing_data_is_ignored():
    img = random_image(3, 4, 1, np.uint8)
    msg = raw_msg(img, 'mono8')
    msg.data += b'\x00' * 10
    np.testing.assert_array_equal(image_to_numpy(msg)[0], img)


@pytest.mark.parametrize('encoding', ['mono16', '16UC1', 'rgb16', 'bgra16'])
@pytest.mark.parametrize('pad', [0, 1, 6])
def test_big_endian_16bit_is_byteswapped(encoding, pad):
    channels, _, _ = RAW[encoding]
    img = random_image(5, 7, channels, np.uint16, seed=pad)
    img.flat[0] = 0x0102  # asymmetric bytes: a missed swap cannot pass by accident
    for bigendian in (True, False):
        msg = raw_msg(img, encoding, pad=pad, bigendian=bigendian)
        out, _ = image_to_numpy(msg)
        assert out.dtype == np.uint16 and out.dtype.isnative
        np.testing.assert_array_equal(out, img)
    msg = raw_msg(img, encoding, pad=pad, bigendian=True)
    msg.is_bigendian = True  # some publishers set a bool
    np.testing.assert_array_equal(image_to_numpy(msg)[0], img)


def test_serialized_message_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import Header
    img = random_image(48, 64, 3, np.uint8)
    header = Header(frame_id='camera_optical')
    header.stamp.sec = 42
    msg = numpy_to_image(img, 'bgr8', header=header)
    back = deserialize_message(serialize_message(msg), sensor_msgs.Image)
    assert back.header.frame_id == 'camera_optical' and back.header.stamp.sec == 42
    out, order = image_to_numpy(back)
    assert order == 'bgr'
    np.testing.assert_array_equal(out, img)


def test_numpy_to_image_custom_msg_type_and_hxwx1():
    class Duck:
        pass
    img = random_image(3, 5, 1, np.uint16)
    msg = numpy_to_image(img[:, :, None], '16UC1', msg_type=Duck)
    assert isinstance(msg, Duck) and msg.step == 10
    np.testing.assert_array_equal(image_to_numpy(msg)[0], img)


def test_numpy_to_image_accepts_non_contiguous_input():
    img = random_image(20, 30, 3, np.uint8)
    view = img[2:12, 5:25]
    msg = numpy_to_image(view, 'rgb8')
    np.testing.assert_array_equal(image_to_numpy(msg)[0], view)


@pytest.mark.parametrize('image,encoding', [
    (np.zeros((4, 4), np.uint8), 'rgb8'),
    (np.zeros((4, 4, 3), np.uint8), 'mono8'),
    (np.zeros((4, 4, 3), np.uint8), 'rgba8'),
    (np.zeros((4, 4), np.uint16), 'mono8'),
    (np.zeros((4, 4), np.uint8), '16UC1'),
    (np.zeros((4, 4, 3), np.float32), 'rgb8'),
])
def test_numpy_to_image_rejects_mismatched_arrays(image, encoding):
    with pytest.raises(ValueError):
        numpy_to_image(image, encoding)


def test_numpy_to_image_rejects_yuv_and_unknown():
    for enc in ('yuv422', 'bayer_rggb8'):
        with pytest.raises(ImageError) as e:
            numpy_to_image(np.zeros((2, 2, 3), np.uint8), enc)
        assert reason_of(e) == 'unsupported_encoding'


def test_1280x720_round_trip_is_fast():
    img = random_image(720, 1280, 3, np.uint8)
    numpy_to_image(img, 'rgb8')  # warm up the lazy import
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        out, _ = image_to_numpy(numpy_to_image(img, 'rgb8'))
        best = min(best, time.perf_counter() - t0)
    np.testing.assert_array_equal(out, img)
    # Typically ~1 ms; 200 ms only catches a per-pixel Python loop sneaking in.
    assert best < 0.2, f'{best * 1e3:.1f} ms'


# --- YUV422 -----------------------------------------------------------------------------

@pytest.mark.parametrize('encoding', YUV_UYVY + YUV_YUYV)
@pytest.mark.parametrize('h,w,pad', [(2, 2, 0), (6, 10, 0), (9, 34, 4), (48, 64, 2)])
def test_yuv422_decodes_to_rgb(encoding, h, w, pad):
    rgb = pair_constant_rgb(h, w, seed=w)
    order = 'uyvy' if encoding in YUV_UYVY else 'yuyv'
    msg = raw_msg(rgb_to_yuv422(rgb, order), encoding, pad=pad)
    assert msg.step == w * 2 + pad
    out, color_order = image_to_numpy(msg)
    assert color_order == 'rgb'
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert diff.max() <= 3, diff.max()


def test_yuv422_byte_orders_are_not_swapped():
    # Pure red and blue pairs: reading UYVY as YUYV would turn them into other colours.
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :2] = (220, 30, 30)
    rgb[:, 2:] = (30, 30, 220)
    uyvy = image_to_numpy(raw_msg(rgb_to_yuv422(rgb, 'uyvy'), 'yuv422'))[0]
    yuyv = image_to_numpy(raw_msg(rgb_to_yuv422(rgb, 'yuyv'), 'yuv422_yuy2'))[0]
    assert np.abs(uyvy.astype(int) - rgb).max() <= 3
    assert np.abs(yuyv.astype(int) - rgb).max() <= 3
    swapped = image_to_numpy(raw_msg(rgb_to_yuv422(rgb, 'uyvy'), 'yuyv'))[0]
    assert np.abs(swapped.astype(int) - rgb).max() > 50


def test_yuv422_matches_opencv_encoder():
    rgb = pair_constant_rgb(24, 32, seed=3)
    for enc, code in (('uyvy', cv2.COLOR_RGB2YUV_UYVY), ('yuyv', cv2.COLOR_RGB2YUV_YUY2)):
        packed = cv2.cvtColor(rgb, code)
        out = image_to_numpy(raw_msg(packed, enc))[0]
        assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 3


def test_yuv422_odd_width_rejected():
    msg = SimpleNamespace(height=2, width=5, encoding='yuv422', is_bigendian=0, step=10,
                          data=bytes(20))
    with pytest.raises(ImageError) as e:
        image_to_numpy(msg)
    assert reason_of(e) == 'odd_width'
    assert 'width 5' in str(e.value)


# --- compressed -------------------------------------------------------------------------

def smooth_rgb(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 255 // max(h + w - 2, 1)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize('h,w', [(1, 1), (7, 33), (480, 640)])
def test_png_round_trip_is_exact(h, w):
    rgb = random_image(h, w, 3, np.uint8)
    msg = encode_compressed(rgb, fmt='png')
    assert isinstance(msg, sensor_msgs.CompressedImage)
    assert msg.format == 'rgb8; png compressed bgr8'
    out, order = compressed_to_numpy(msg)
    assert order == 'bgr'
    np.testing.assert_array_equal(out, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_png_mono_rgba_and_16bit():
    mono = random_image(9, 11, 1, np.uint8)
    out, _ = compressed_to_numpy(encode_compressed(mono, fmt='png'))
    np.testing.assert_array_equal(out, mono)
    depth = random_image(9, 11, 1, np.uint16)
    msg = encode_compressed(depth, fmt='png')
    assert msg.format == 'mono16; png compressed mono16'
    out, _ = compressed_to_numpy(msg)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, depth)
    rgba = random_image(9, 11, 4, np.uint8)
    out, order = compressed_to_numpy(encode_compressed(rgba, fmt='png'))
    np.testing.assert_array_equal(out, cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


@pytest.mark.parametrize('h,w', [(8, 8), (31, 45), (720, 1280)])
def test_jpeg_round_trip_is_close(h, w):
    rgb = smooth_rgb(h, w)
    msg = encode_compressed(rgb, fmt='jpeg', quality=95)
    assert msg.format == 'rgb8; jpeg compressed bgr8'
    out, order = compressed_to_numpy(msg)
    assert order == 'bgr' and out.shape == (h, w, 3) and out.dtype == np.uint8
    back = cv2.cvtColor(out, cv2.COLOR_BGR2RGB).astype(int)
    # Chroma subsampling blurs the steep 8x8 ramp; swapped channels would be off by ~80.
    assert np.abs(back - rgb).mean() < 6


def test_jpeg_mono_decodes_to_2d():
    mono = smooth_rgb(16, 16)[:, :, 0]
    msg = encode_compressed(mono, fmt='jpg')
    assert msg.format == 'mono8; jpeg compressed mono8'
    out, _ = compressed_to_numpy(msg)
    assert out.shape == (16, 16)


@pytest.mark.parametrize('fmt', ['jpeg', 'jpg', 'JPEG', 'png', 'rgb8; jpeg compressed bgr8',
                                 'bgr8; png compressed', 'mono8; jpeg compressed mono8', ''])
def test_format_strings_accepted(fmt):
    rgb = smooth_rgb(10, 12)
    codec = 'png' if 'png' in fmt else 'jpeg'
    src = encode_compressed(rgb, fmt=codec)
    out, _ = compressed_to_numpy(SimpleNamespace(format=fmt, data=bytes(src.data)))
    assert out.shape == (10, 12, 3)


def test_compressed_header_size():
    rgb = smooth_rgb(37, 53)
    for fmt in ('jpeg', 'png'):
        assert image_codec.compressed_header_size(encode_compressed(rgb, fmt=fmt).data) == (
            53, 37)
    assert image_codec.compressed_header_size(b'not an image') is None


def test_encode_compressed_rejects_bad_input():
    with pytest.raises(ImageError) as e:
        encode_compressed(smooth_rgb(4, 4), fmt='webp')
    assert reason_of(e) == 'unsupported_format'
    with pytest.raises(ValueError):
        encode_compressed(np.zeros((4, 4), np.uint16), fmt='jpeg')
    with pytest.raises(ValueError):
        encode_compressed(np.zeros((4, 4, 4), np.uint8), fmt='jpeg')
    with pytest.raises(ValueError):
        encode_compressed(np.zeros((4, 4, 3), np.float32), fmt='png')


# --- bad raw frames ---------------------------------------------------------------------

def good_msg(**overrides):
    msg = raw_msg(np.zeros((480, 640, 3), np.uint8), 'rgb8')
    for k, v in overrides.items():
        setattr(msg, k, v)
    return msg


@pytest.mark.parametrize('overrides,reason,text', [
    ({'width': 0}, 'empty', '0x480'),
    ({'height': 0}, 'empty', '640x0'),
    ({'step': 1900}, 'step_mismatch', 'step 1900 < width 640 * 3 bytes'),
    ({'step': 0}, 'step_mismatch', 'step 0 < width 640'),
    ({'data': bytes(1920 * 480 - 1)}, 'truncated', f'data is {1920 * 480 - 1} bytes'),
    ({'data': b''}, 'truncated', 'data is 0 bytes'),
    ({'step': 2000}, 'truncated', '2000 * height 480'),
    ({'encoding': 'bayer_rggb8'}, 'unsupported_encoding', "'bayer_rggb8'"),
    ({'encoding': ''}, 'unsupported_encoding', 'supported: rgb8'),
    ({'encoding': '32FC1'}, 'unsupported_encoding', 'yuv422'),
])
def test_bad_raw_frames(overrides, reason, text):
    with pytest.raises(ImageError) as e:
        image_to_numpy(good_msg(**overrides))
    assert reason_of(e) == reason
    assert text in str(e.value)


def test_too_large_checked_before_data():
    # A forged 100000x100000 header with no data must be too_large, not a huge allocation.
    msg = good_msg(width=100000, height=100000, step=300000, data=b'')
    with pytest.raises(ImageError) as e:
        image_to_numpy(msg)
    assert reason_of(e) == 'too_large'
    assert '100000x100000' in str(e.value)
    with pytest.raises(ImageError) as e:
        image_to_numpy(good_msg(), max_pixels=640 * 480 - 1)
    assert reason_of(e) == 'too_large'
    assert image_to_numpy(good_msg(), max_pixels=640 * 480)[0].shape == (480, 640, 3)
    assert image_to_numpy(good_msg(), max_pixels=None)[0].shape == (480, 640, 3)


# --- bad compressed frames --------------------------------------------------------------

def forged_png(width, height):
    good = bytes(encode_compressed(smooth_rgb(4, 4), fmt='png').data)
    return good[:16] + struct.pack('>II', width, height) + good[24:]


def forged_jpeg(width, height):
    good = bytearray(encode_compressed(smooth_rgb(4, 4), fmt='jpeg').data)
    pos = 2
    while good[pos + 1] not in (0xC0, 0xC2):
        pos += 2 + struct.unpack('>H', good[pos + 2:pos + 4])[0]
    good[pos + 5:pos + 9] = struct.pack('>HH', height, width)
    return bytes(good)


@pytest.mark.parametrize('fmt,data', [
    ('png', forged_png(100000, 100000)),
    ('jpeg', forged_jpeg(65000, 65000)),
])
def test_compressed_too_large_rejected_before_decoding(monkeypatch, fmt, data):
    def no_decode(*args):
        raise AssertionError('imdecode must not run for an oversized header')
    monkeypatch.setattr(image_codec.cv2, 'imdecode', no_decode)
    with pytest.raises(ImageError) as e:
        compressed_to_numpy(SimpleNamespace(format=fmt, data=data))
    assert reason_of(e) == 'too_large'


def test_compressed_too_large_after_decoding():
    msg = encode_compressed(smooth_rgb(100, 100), fmt='jpeg')
    with pytest.raises(ImageError) as e:
        compressed_to_numpy(msg, max_pixels=5000)
    assert reason_of(e) == 'too_large'
    assert compressed_to_numpy(msg, max_pixels=10000)[0].shape == (100, 100, 3)


def test_compressed_bad_inputs():
    jpeg = bytes(encode_compressed(smooth_rgb(64, 64), fmt='jpeg').data)
    png = bytes(encode_compressed(smooth_rgb(64, 64), fmt='png').data)
    rng = np.random.default_rng(1)
    cases = [
        ('jpeg', b'', 'empty'),
        ('jpeg', rng.integers(0, 255, 500, dtype=np.uint8).tobytes(), 'corrupt_compressed'),
        ('png', b'\x89PNG\r\n\x1a\n' + bytes(40), 'corrupt_compressed'),
        ('jpeg', jpeg[:len(jpeg) // 2], 'corrupt_compressed'),
        ('png', png[:len(png) // 2], 'corrupt_compressed'),
        ('tiff', png, 'unsupported_format'),
        ('h264', jpeg, 'unsupported_format'),
        ('16UC1; compressedDepth png', png, 'unsupported_format'),
        ('', b'GIF89a' + bytes(20), 'unsupported_format'),
    ]
    for fmt, data, reason in cases:
        with pytest.raises(ImageError) as e:
            compressed_to_numpy(SimpleNamespace(format=fmt, data=data))
        assert reason_of(e) == reason, (fmt, str(e.value))

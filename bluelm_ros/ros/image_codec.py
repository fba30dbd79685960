"""Conversion between ROS 2 image messages and numpy arrays (our own cv_bridge).

Messages are duck-typed by their fields, so this module imports nothing from rclpy at import
time: a ``sensor_msgs/Image`` needs ``height, width, encoding, is_bigendian, step, data`` and a
``sensor_msgs/CompressedImage`` needs ``format, data``.  Decoding returns ``(array,
color_order)``: the array is HxW (mono) or HxWx3 / HxWx4, uint8 or uint16, and
``color_order`` is ``'rgb'`` or ``'bgr'`` (always one of the two, so it can go straight to
``runtime.image.to_rgb_uint8``; for a 2-D array it carries no meaning). A frame that cannot
be converted raises ``runtime.image.ImageError`` with its ``reason``.

Raw images are returned as views of ``msg.data`` where possible (row padding from ``step`` is
sliced off by strides, not copied), so the result may be read-only or non-contiguous: copy it
before writing to it or keeping it past the message.
"""
import array
import re
import struct

import cv2
import numpy as np

from bluelm_ros.runtime.image import check_size, ImageError, MAX_PIXELS

# encoding -> (channels, bytes per channel, color order, YUV422 cv2 code or None).
# YUV422 is 2 bytes per pixel on the wire (one luma + half of a shared chroma pair).
_ENCODINGS = {
    'rgb8': (3, 1, 'rgb', None),
    'bgr8': (3, 1, 'bgr', None),
    'rgba8': (4, 1, 'rgb', None),
    'bgra8': (4, 1, 'bgr', None),
    'rgb16': (3, 2, 'rgb', None),
    'bgr16': (3, 2, 'bgr', None),
    'rgba16': (4, 2, 'rgb', None),
    'bgra16': (4, 2, 'bgr', None),
    'mono8': (1, 1, 'rgb', None),
    'mono16': (1, 2, 'rgb', None),
    '8UC1': (1, 1, 'rgb', None),
    '16UC1': (1, 2, 'rgb', None),
    # OpenCV-style type names: OpenCV's channel order is BGR.
    '8UC3': (3, 1, 'bgr', None),
    '8UC4': (4, 1, 'bgr', None),
    # sensor_msgs' YUV422 is UYVY byte order; YUV422_YUY2 is YUYV.
    'yuv422': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_UYVY),
    'uyvy': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_UYVY),
    'UYVY': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_UYVY),
    'yuv422_yuy2': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_YUY2),
    'yuyv': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_YUY2),
    'YUYV': (2, 1, 'rgb', cv2.COLOR_YUV2RGB_YUY2),
}

SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
_ENCODINGS_LOWER = {name.lower(): spec for name, spec in _ENCODINGS.items()}


def _lookup(encoding):
    spec = _ENCODINGS.get(encoding)
    if spec is None:
        # Drivers disagree on case ('RGB8', 'Mono8'); the lower-case spelling is canonical.
        spec = _ENCODINGS_LOWER.get(str(encoding).strip().lower())
    if spec is None:
        raise ImageError(f'unsupported encoding {encoding!r}; supported: '
                         f'{", ".join(SUPPORTED_ENCODINGS)}', 'unsupported_encoding')
    return spec


def bytes_per_pixel(encoding):
    """Bytes one pixel takes in a raw Image of this encoding (2 for YUV422)."""
    channels, depth, _, _ = _lookup(encoding)
    return channels * depth


def _as_bytes(data):
    """View message data (array.array, bytes, memoryview, ...) as a flat uint8 array."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        # A plain list of ints (hand-built messages): slow, but only tests do this.
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_to_numpy(msg, max_pixels=MAX_PIXELS):
    """Convert a sensor_msgs/Image to ``(array, color_order)``.

    The array is a strided view of ``msg.data`` when no conversion is needed; 16-bit data in
    the other byte order is byte-swapped into a copy and YUV422 is converted to RGB.  Raises
    ``ImageError`` for an empty, oversized, malformed or unsupported frame.
    """
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f'empty image: {width}x{height}', 'empty')
    channels, depth, color_order, yuv_code = _lookup(msg.encoding)
    bpp = channels * depth
    check_size(width, height, max_pixels)
    if yuv_code is not None and width % 2:
        raise ImageError(f'{msg.encoding} needs an even width (pixel pairs share chroma), '
                         f'got width {width}', 'odd_width')
    if step < width * bpp:
        raise ImageError(f'step {step} < width {width} * {bpp} bytes ({msg.encoding})',
                         'step_mismatch')
    buf = _as_bytes(msg.data)
    if buf.size < step * height:
        raise ImageError(f'data is {buf.size} bytes < step {step} * height {height} = '
                         f'{step * height}', 'truncated')

    if depth == 2:
        dtype = np.dtype('>u2' if msg.is_bigendian else '<u2')
    else:
        dtype = np.dtype(np.uint8)
    shape = (height, width) if channels == 1 else (height, width, channels)
    strides = (step, depth) if channels == 1 else (step, bpp, depth)
    # Strides skip the row padding in place: no copy for the common case.
    image = np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)

    if yuv_code is not None:
        return cv2.cvtColor(image, yuv_code), color_order
    if depth == 2:
        if dtype.isnative:
            if not image.flags.aligned:
                # An odd step leaves uint16 rows misaligned, which OpenCV rejects.
                image = np.ascontiguousarray(image)
        else:
            image = image.astype(np.uint16)  # byte-swapping copy into native order
    return image, color_order


# Fragments of CompressedImage.format that name a codec cv2.imdecode handles.
_COMPRESSED_RE = re.compile(r'jpe?g|png', re.IGNORECASE)
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8'
# JPEG start-of-frame markers carry the size; C4/C8/CC are DHT/JPG/DAC, not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


def _png_size(head):
    if len(head) >= 24 and head[12:16] == b'IHDR':
        return struct.unpack('>II', head[16:24])
    return None


def _jpeg_size(data):
    """Width and height from the first JPEG SOF marker, or None if not found."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header: give up
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                return None
            height, width = struct.unpack('>HH', bytes(data[pos + 5:pos + 9]))
            # Height 0 means "defined later by a DNL marker": unknown here.
            return (width, height) if height else None
        (length,) = struct.unpack('>H', bytes(data[pos + 2:pos + 4]))
        pos += 2 + length
    return None


def compressed_header_size(data):
    """Return ``(width, height)`` from a PNG/JPEG header without decoding, or None."""
    buf = memoryview(_as_bytes(data))
    head = bytes(buf[:24])
    if head.startswith(_PNG_MAGIC):
        return _png_size(head)
    if head.startswith(_JPEG_MAGIC):
        return _jpeg_size(buf)
    return None


def compressed_to_numpy(msg, max_pixels=MAX_PIXELS):
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to ``(array, 'bgr')``.

    The array is what OpenCV decodes: HxW for grayscale, HxWx3 BGR, HxWx4 BGRA for PNG with
    alpha, uint16 for 16-bit PNG.  The size in the header is checked against ``max_pixels``
    before decoding, so a forged header cannot make us allocate gigabytes.
    """
    fmt = str(msg.format)
    buf = _as_bytes(msg.data)
    if buf.size == 0:
        raise ImageError(f'empty compressed image (format {fmt!r})', 'empty')
    if 'compresseddepth' in fmt.lower():
        # compressed_depth_image_transport prefixes a config header and quantizes 32FC1.
        raise ImageError(f'compressedDepth is not supported: {fmt!r}', 'unsupported_format')
    if not _COMPRESSED_RE.search(fmt):
        head = bytes(buf[:8])
        # Some old drivers leave format empty: trust the magic bytes then, nothing else.
        if fmt.strip() or not (head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)):
            raise ImageError(f'unsupported compressed format {fmt!r}; '
                             'expected one containing jpeg, jpg or png', 'unsupported_format')
    size = compressed_header_size(buf)
    if size is not None:
        check_size(size[0], size[1], max_pixels)
    if bytes(buf[:2]) == _JPEG_MAGIC and bytes(buf[-1024:]).rfind(b'\xff\xd9') < 0:
        # libjpeg "decodes" a cut-off JPEG into a half-grey frame; the missing end-of-image
        # marker (FFD9 never occurs inside entropy-coded data) is how we tell.
        raise ImageError(f'truncated JPEG: no end-of-image marker in {buf.size} bytes',
                         'corrupt_compressed')
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f'cannot decode {buf.size} bytes of {fmt!r}: {exc}',
                         'corrupt_compressed') from exc
    if image is None or image.size == 0:
        raise ImageError(f'cannot decode {buf.size} bytes of {fmt!r}', 'corrupt_compressed')
    # The header check can miss (no SOF found, DNL height); the decoded size cannot.
    check_size(image.shape[1], image.shape[0], max_pixels)
    return image, 'bgr'


def _to_message_bytes(image):
    """Copy a C-contiguous array into the array.array('B') that rclpy stores for uint8[]."""
    data = array.array('B')
    # frombytes is one memcpy; array.array('B', image.tobytes()) is ten times slower, and
    # assigning bytes makes rclpy check every element in Python.
    data.frombytes(image.reshape(-1).view(np.uint8))
    return data


def numpy_to_image(image, encoding, header=None, msg_type=None):
    """Build a sensor_msgs/Image (or ``msg_type``) from an array in ``encoding``.

    ``image`` must already be in the encoding's channel order: HxW (or HxWx1) for mono and
    xUC1, HxWx3 / HxWx4 otherwise; uint8 for 8-bit encodings, uint16 for 16-bit ones.
    YUV422 is not produced.  Data is little-endian (``is_bigendian = 0``), ``step`` is
    ``width * bytes_per_pixel``.
    """
    channels, depth, _, yuv_code = _lookup(encoding)
    if yuv_code is not None:
        raise ImageError(f'cannot encode to {encoding!r}', 'unsupported_encoding')
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1 and channels == 1:
        image = image[:, :, 0]
    want_ndim = 2 if channels == 1 else 3
    if image.ndim != want_ndim or (channels > 1 and image.shape[2] != channels):
        raise ValueError(
            f'{encoding} needs {"HxW" if channels == 1 else f"HxWx{channels}"}, '
            f'got shape {image.shape}')
    want_dtype = np.uint16 if depth == 2 else np.uint8
    if image.dtype != want_dtype:
        raise ValueError(f'{encoding} needs {np.dtype(want_dtype).name}, got {image.dtype}')
    height, width = image.shape[:2]
    if depth == 2:
        image = np.ascontiguousarray(image, dtype='<u2')  # wire order is little-endian
    else:
        image = np.ascontiguousarray(image)
    if msg_type is None:
        from sensor_msgs.msg import Image as msg_type
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.height = int(height)
    msg.width = int(width)
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(width) * channels * depth
    msg.data = _to_message_bytes(image)
    return msg


def encode_compressed(array_rgb, fmt='jpeg', quality=90, header=None, msg_type=None):
    """Encode an RGB (HxWx3), RGBA (PNG only) or mono (HxW) array to a CompressedImage.

    ``quality`` is the JPEG quality (0-100); PNG ignores it.  16-bit arrays need PNG.  The
    ``format`` string follows image_transport, e.g. ``'rgb8; jpeg compressed bgr8'``.
    """
    fmt = fmt.lower()
    if fmt == 'jpg':
        fmt = 'jpeg'
    if fmt not in ('jpeg', 'png'):
        raise ImageError(f"fmt must be 'jpeg' or 'png', got {fmt!r}", 'unsupported_format')
    image = np.asarray(array_rgb)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype not in (np.uint8, np.uint16) or (image.dtype == np.uint16 and fmt != 'png'):
        raise ValueError(f'cannot encode {image.dtype} as {fmt}')
    bits = 8 if image.dtype == np.uint8 else 16
    if image.ndim == 2:
        src_enc = wire_enc = f'mono{bits}'
        bgr = image
    elif image.ndim == 3 and image.shape[2] == 3:
        src_enc, wire_enc = f'rgb{bits}', f'bgr{bits}'
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4 and fmt == 'png':
        src_enc, wire_enc = f'rgba{bits}', f'bgra{bits}'
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    else:
        raise ValueError(f'cannot encode shape {image.shape} as {fmt}')
    if fmt == 'jpeg':
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]  # zlib level 3: fast, most of the gain
    ok, encoded = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', bgr, params)
    if not ok:
        raise ValueError(f'cv2.imencode failed for {fmt} {image.shape} {image.dtype}')
    if msg_type is None:
        from sensor_msgs.msg import CompressedImage as msg_type
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.format = f'{src_enc}; {fmt} compressed {wire_enc}'
    msg.data = _to_message_bytes(encoded)
    return msg


def frame_to_numpy(msg, max_pixels=MAX_PIXELS):
    """Decode an Image or CompressedImage message; return (array, color_order)."""
    if hasattr(msg, 'format'):
        return compressed_to_numpy(msg, max_pixels)
    return image_to_numpy(msg, max_pixels)

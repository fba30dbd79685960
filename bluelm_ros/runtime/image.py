"""Image conversion for the models: any camera layout -> RGB uint8, one error type, one limit.

The segmenter, the VLM engine and the ROS message codec (``ros/image_codec.py``) all refuse
bad input with :class:`ImageError` and the same pixel limit, so callers catch one type and
count failures by its ``reason``.
"""
import cv2
import numpy as np

# Anything larger is a corrupt header, not a camera (and would allocate gigabytes).
MAX_PIXELS = 8192 * 8192

# Why an image was refused: the message codec's reasons, and 'bad_image' for the rest.
REASONS = (
    'unsupported_encoding', 'step_mismatch', 'truncated', 'empty', 'too_large',
    'corrupt_compressed', 'unsupported_format', 'odd_width', 'bad_image',
)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, message, reason='bad_image'):
        super().__init__(message)
        self.reason = reason


def check_size(width, height, max_pixels=MAX_PIXELS):
    """Raise ImageError('too_large') if width x height exceeds max_pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f'image {width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}',
            'too_large')


def to_rgb_uint8(image, color_order='rgb'):
    """Convert mono/RGB/BGR/RGBA/BGRA, uint8/uint16, to HxWx3 RGB uint8 (no copy if RGB)."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f'expected a numpy array, got {type(image).__name__}')
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f'expected HxW, HxWx3 or HxWx4, got shape {image.shape}')
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(f'empty image ({w}x{h})')
    if h * w > MAX_PIXELS:
        raise ImageError(f'image {w}x{h} is larger than the {MAX_PIXELS} pixel limit')
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)  # keep the top 8 bits: the visible range
    elif image.dtype != np.uint8:
        raise ImageError(f'expected uint8 or uint16 pixels, got {image.dtype}')
    if color_order not in ('rgb', 'bgr'):
        raise ImageError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        code = cv2.COLOR_RGBA2RGB if color_order == 'rgb' else cv2.COLOR_BGRA2RGB
        return cv2.cvtColor(image, code)
    if color_order == 'bgr':
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image

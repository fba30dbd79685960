"""Scene QA messages <-> the runtime's service types (bluelm_ros/AskScene, SceneAnswer).

Pure mapping, no node state: request images and GenerationOptions in, Answers out.
"""
import dataclasses

from std_msgs.msg import Header

from bluelm_ros.ros import image_codec
from bluelm_ros.runtime.image import ImageError, to_rgb_uint8
from bluelm_ros.runtime.scene_qa_service import GENERATION_LIMITS, RequestError


def request_image(req, max_pixels):
    """Return ``(RGB uint8, header)`` of a request's image or compressed image, else None.

    ``image`` wins when both are set. Raises RequestError('bad_image') naming the reason.
    """
    try:
        if req.image.width or req.image.height or len(req.image.data):
            arr, order = image_codec.image_to_numpy(req.image, max_pixels)
            return to_rgb_uint8(arr, order).copy(), req.image.header
        if len(req.compressed_image.data):
            arr, order = image_codec.compressed_to_numpy(req.compressed_image, max_pixels)
            return to_rgb_uint8(arr, order).copy(), req.compressed_image.header
    except ImageError as exc:
        raise RequestError('bad_image', f'the request image cannot be used ({exc.reason}): '
                                        f'{exc}')
    return None


def drop_request_images(req):
    """Replace a request's image fields by empty ones (frees their pixel data)."""
    req.image = type(req.image)()
    req.compressed_image = type(req.compressed_image)()


# The one value of a GenerationOptions field that means "the node's default" (the
# message's default). Any other negative value is a mistake, refused rather than guessed.
USE_DEFAULT = -1


def generation(opts, default):
    """Merge a GenerationOptions message (field -1 = default) into ``default``.

    Raises RequestError('bad_request') for a value outside its range (NaN, -inf and
    negatives other than -1 included).
    """
    if opts is None:
        return default
    values = {}
    for name, (lo, hi) in GENERATION_LIMITS.items():
        value = getattr(opts, name)
        if value == USE_DEFAULT:
            continue
        # written so that NaN fails too
        if not lo <= value <= hi or (name == 'top_p' and value == 0.0):
            what = '(0, 1]' if name == 'top_p' else f'[{lo}, {hi}]'
            raise RequestError('bad_request', f'options.{name} = {value} is outside '
                               f'{what} (-1 = node default)')
        values[name] = value
    if opts.seed < 0 and opts.seed != USE_DEFAULT:
        raise RequestError('bad_request', f'options.seed = {opts.seed}: use >= 0 for '
                           'reproducible sampling or -1 for a random seed')
    seed = int(opts.seed) if opts.seed >= 0 else None
    return dataclasses.replace(default, **values, seed=seed,
                               stop_strings=tuple(s for s in opts.stop if s))


def answer_msg(msg_module, answer):
    """Return the SceneAnswer message of a runtime Answer."""
    msg = msg_module.SceneAnswer()
    msg.header = answer.frame_tag if answer.frame_tag is not None else Header()
    msg.question = answer.question
    msg.answer = answer.text
    t = answer.timings
    if t is not None:
        msg.timings = msg_module.Timings(
            image_encode_ms=float(t.image_encode_ms), image_cached=bool(t.image_cached),
            image_tiles=int(t.image_tiles), prefill_ms=float(t.prefill_ms),
            prompt_tokens=int(t.prompt_tokens), decode_ms=float(t.decode_ms),
            generated_tokens=int(t.generated_tokens),
            tokens_per_second=float(t.tokens_per_second))
    msg.timings.queue_ms = float(answer.queue_ms)
    msg.timings.total_ms = float(answer.total_ms)
    msg.success = answer.success
    msg.error_code, msg.error_message = answer.error_code, answer.error_message
    return msg


def fill_result(out, answer):
    """Copy a SceneAnswer into a service response or an action result; return it."""
    out.success, out.answer = answer.success, answer.answer
    out.error_code, out.error_message = answer.error_code, answer.error_message
    out.image_header, out.timings = answer.header, answer.timings
    return out

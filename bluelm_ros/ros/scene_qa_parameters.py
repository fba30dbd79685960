"""The scene QA node's parameters: declarations, the lifecycle rule, the service settings.

See docs/scene-qa-node.md for the table; ``common.parameter_change_reason`` applies the
lifecycle rule (MODEL_PARAMS only while unconfigured, SUBSCRIPTION_PARAMS while inactive).
"""
from bluelm_ros.ros import common
from bluelm_ros.runtime.image import MAX_PIXELS
from bluelm_ros.runtime.scene_qa_service import Generation, Settings
from bluelm_ros.runtime.vlm.bundle import EXPORT_COMMAND

BUNDLE_HINT = (f'Set bundle_path to a bundle folder written by `{EXPORT_COMMAND} MODEL_DIR '
               'OUT_DIR` (or leave it empty for the shipped scene-tiny bundle).')
DEFAULT_BUNDLE_HINT = (
    'The shipped scene-tiny bundle is not installed in this copy of bluelm_ros: train and '
    'export it (scripts/train_scene_vlm.sh, then '
    f'`{EXPORT_COMMAND} runs/scene-tiny bluelm_ros/models/vlm/scene-tiny` and '
    'scripts/setup.sh), or set bundle_path to another bundle folder.')
INPUT_TYPES = ('raw', 'compressed')
# A burst of 100 requests (a fleet's clients at once) waits instead of getting "busy": an
# instant "busy" reply to every client is what overflows default (keep-last-10) clients.
# Each waiting request holds an idle executor thread (rclpy services cannot answer later
# from another thread); the thread pool only grows to what is used.
QUEUE_SIZE = 128
# Measured, 100 goals with a 1280x720 image (10 at a time): RSS +60 MB and growing with
# glibc's dynamic threshold (malloc_trim when idle did not help: fragmented arenas), flat
# (+3 MB) with 1 MB. The price: page faults on big buffers (the 3B decoder's prefill was
# ~15 % slower with it, see runtime/memory.py); 0 turns it off.
HEAP_MMAP_THRESHOLD = 1 << 20
# Applied when the bundle is loaded (configure): changeable only while unconfigured.
MODEL_PARAMS = ('bundle_path', 'vision_precision', 'decoder_precision', 'providers', 'threads',
                'prefill_chunk')
# Applied when the subscriptions are created (activate): changeable while not active.
SUBSCRIPTION_PARAMS = ('input_type', 'qos.reliability', 'qos.durability', 'qos.depth',
                       'use_scene_context')
CHOICES = {'vision_precision': ('int8', 'fp32'), 'decoder_precision': ('int4', 'fp32'),
           'input_type': INPUT_TYPES, 'qos.reliability': common.RELIABILITY_CHOICES,
           'qos.durability': common.DURABILITY_CHOICES}


def declare(node):
    """Declare every parameter of the node (descriptors, ranges, choices)."""
    p = common.declare_param
    p(node, 'autostart', True,
      'Configure and activate on startup (off: wait for lifecycle transitions).',
      read_only=True)
    p(node, 'bundle_path', '',
      f'VLM bundle folder. {BUNDLE_HINT} A relative path is also looked up under the '
      'package models/vlm/ folder. Reconfigure to change.')
    p(node, 'vision_precision', 'int8', 'Vision graph to run. Reconfigure to change.',
      choices=CHOICES['vision_precision'])
    p(node, 'decoder_precision', 'int4', 'Decoder graph to run. Reconfigure to change.',
      choices=CHOICES['decoder_precision'])
    p(node, 'providers', ['CPUExecutionProvider'],
      'ONNX Runtime providers, in order of preference. Reconfigure to change.')
    p(node, 'threads', 0,
      'ONNX Runtime intra-op threads (0 = one per core). Reconfigure to change.',
      value_range=(0, 256))
    p(node, 'prefill_chunk', 128,
      'Prompt tokens per decoder call (chunked prefill). Reconfigure to change.',
      value_range=(1, 4096))
    p(node, 'input_type', 'raw',
      "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage on "
      "'<resolved image topic>/compressed'. Change while inactive.", choices=INPUT_TYPES)
    common.declare_qos_parameters(node, 'qos', what='image')
    p(node, 'max_input_pixels', MAX_PIXELS,
      'Frames (or request images) larger than this are refused.',
      value_range=(1, MAX_PIXELS))
    p(node, 'generation.max_new_tokens', 32, 'Default answer length limit (tokens).',
      value_range=(1, 4096))
    p(node, 'generation.temperature', 0.0, 'Default temperature (0 = greedy).',
      value_range=(0.0, 5.0))
    p(node, 'generation.top_k', 0, 'Default top-k (0 = off).', value_range=(0, 100000))
    p(node, 'generation.top_p', 1.0, 'Default nucleus mass (1 = off).',
      value_range=(0.0, 1.0))
    p(node, 'queue_size', QUEUE_SIZE,
      'Requests waiting for the model (the running one not counted); more get "busy". '
      'Each waiting service call or goal holds an executor thread: run_node gives the '
      'executor queue_size + 4 threads.',
      value_range=(1, 256), read_only=True)
    p(node, 'request_timeout', 60.0,
      'Seconds a request may wait + run before "timeout" (a running answer stops at the '
      'next token and returns its partial text).', value_range=(0.1, 3600.0))
    p(node, 'eager_encoding', True,
      'Encode new frames in the background (decoupled image encoding); questions are '
      'then about the newest encoded frame.')
    p(node, 'eager_encoding_rate', 1.0, 'Max eager encodings per second.',
      value_range=(0.01, 100.0))
    p(node, 'max_question_chars', 500, 'Longer questions are refused.',
      value_range=(1, 100000))
    p(node, 'system_prompt', '', 'Optional system prompt for every question.')
    p(node, 'use_scene_context', False,
      'Add the segmentation class shares (scene_context topic, bluelm_ros/ClassStats) to '
      'the system prompt. The shipped model was not trained with it: use it with models '
      'that were. Change while inactive.')
    p(node, 'heap_mmap_threshold', HEAP_MMAP_THRESHOLD,
      'Bytes: larger allocations (request images, their decoded copies) get their own '
      'memory mapping, returned to the OS when freed (glibc mallopt, process-wide). 0: '
      "glibc's default, whose threshold grows to the largest block freed and keeps "
      'request images on heaps that only grow.', value_range=(0, 64 << 20), read_only=True)
    p(node, 'diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
      value_range=(0.1, 60.0), read_only=True)


def settings(node, scene_context=''):
    """Return the service's Settings from the parameters (read live, per question)."""
    def param(name):
        return node.get_parameter(name).value

    system = param('system_prompt') or None
    if param('use_scene_context') and scene_context:
        system = ((system + ' ') if system else '') + scene_context
    return Settings(
        queue_size=param('queue_size'),
        request_timeout=param('request_timeout'),
        eager_encoding=param('eager_encoding'),
        eager_encoding_rate=param('eager_encoding_rate'),
        max_question_chars=param('max_question_chars'), system_prompt=system,
        generation=Generation(*(param(f'generation.{k}') for k in (
            'max_new_tokens', 'temperature', 'top_k', 'top_p'))))

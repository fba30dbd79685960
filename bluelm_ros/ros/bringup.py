"""Run the node set of launch/bluelm_ros.launch.py in one process, from the same YAML.

    bluelm-ros bringup --params config/low_power.yaml --camera-topic /camera/image_raw
    ros2 run bluelm_ros bringup --camera-source synthetic

For machines without `launch`/`launch_ros` (e.g. the PyPI ROS 2 wheels) and for tests:
the nodes get the same parameters file, names, namespace and remappings as with the
launch file, and share one multi-threaded executor.
"""
import argparse
import os
import sys
import time

DEFAULT_PARAMS = 'bluelm_ros.yaml'


def default_params_file(name=DEFAULT_PARAMS):
    """Return the installed config/<name> (ament index), else the source tree's, else ''."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = os.path.join(get_package_share_directory('bluelm_ros'), 'config', name)
        if os.path.exists(path):
            return path
    except Exception:  # not installed with colcon: look next to the sources
        pass
    import bluelm_ros
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        bluelm_ros.__file__))), 'config', name)
    return path if os.path.exists(path) else ''


def node_args(params, namespace, remaps):
    """Build a node's --ros-args: params file, namespace and remappings."""
    args = ['--ros-args']
    if params:
        args += ['--params-file', params]
    if namespace:
        args += ['-r', f'__ns:={namespace if namespace.startswith("/") else "/" + namespace}']
    for src, dst in remaps:
        args += ['-r', f'{src}:={dst}']
    return args


def create_nodes(params='', namespace='', camera_topic='/camera/image_raw',
                 segmentation=True, scene_qa=True, camera_source=None, extra_params=None):
    """Create the nodes (rclpy must be initialised); return {name: node}.

    camera_source: None (use a real camera on camera_topic), 'synthetic', an image folder
    or a video file (the demo camera publishes on camera_topic). extra_params maps a node
    name to rclpy Parameter overrides (they win over the YAML).
    """
    from bluelm_ros.ros.camera_source_node import CameraSourceNode
    from bluelm_ros.ros.scene_qa_node import SceneQANode
    from bluelm_ros.ros.segmentation_node import SegmentationNode
    extra = extra_params or {}
    nodes = {}
    image = [('image', camera_topic)]
    try:
        if camera_source:
            from rclpy.parameter import Parameter
            overrides = ([Parameter('source', value=camera_source)]
                         + extra.get('camera_source', []))
            nodes['camera_source'] = CameraSourceNode(
                'camera_source', cli_args=node_args(params, namespace, image),
                parameter_overrides=overrides)
        if segmentation:
            nodes['segmentation_node'] = SegmentationNode(
                'segmentation_node', cli_args=node_args(params, namespace, image),
                parameter_overrides=extra.get('segmentation_node', []))
        if scene_qa:
            remaps = image + [('scene_context', 'segmentation_node/class_stats')]
            nodes['scene_qa_node'] = SceneQANode(
                'scene_qa_node', cli_args=node_args(params, namespace, remaps),
                parameter_overrides=extra.get('scene_qa_node', []))
    except BaseException:
        for node in nodes.values():  # no half-started set left behind
            node.destroy_node()
        raise
    return nodes


class Bringup:
    """The node set spinning on one MultiThreadedExecutor in a background thread."""

    def __init__(self, **kwargs):
        from bluelm_ros.ros.common import SpinThread, make_executor
        self.nodes = create_nodes(**kwargs)
        # each node gets the threads it would get alone (run_node), plus a few to share
        threads = 4 + sum(getattr(n, 'executor_threads', 2) for n in self.nodes.values())
        self.executor = make_executor(threads)
        for node in self.nodes.values():
            self.executor.add_node(node)
        self.thread = SpinThread(self.executor, 'bringup_executor')

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """Answer pending requests (replies sent), stop the executor, destroy the nodes."""
        from bluelm_ros.ros.common import stop_spinning
        nodes, self.nodes = list(self.nodes.values()), {}
        stop_spinning(nodes, self.executor, self.thread)


def add_arguments(p):
    p.add_argument('--params', default=None,
                   help=f'parameters YAML (default: the installed config/{DEFAULT_PARAMS})')
    p.add_argument('--namespace', default='')
    p.add_argument('--camera-topic', default='/camera/image_raw')
    p.add_argument('--camera-source', default=None,
                   help="also publish demo frames: 'synthetic', an image folder or a video")
    p.add_argument('--no-segmentation', action='store_true')
    p.add_argument('--no-scene-qa', action='store_true')
    p.add_argument('--duration', type=float, default=0.0, help='seconds (0 = until Ctrl-C)')


def run(args):
    import rclpy
    from bluelm_ros.ros.common import init_rclpy, release_dds, ShutdownSignals
    params = args.params if args.params is not None else default_params_file()
    if params and not os.path.isfile(params):
        print(f'bringup: parameters file not found: {params}', file=sys.stderr)
        return 2
    signals = ShutdownSignals().install()  # as run_node: rclpy installs no handlers
    init_rclpy(signals=signals)
    bringup = None
    code = 0
    try:
        signals.interruptible = True
        bringup = Bringup(params=params, namespace=args.namespace,
                          camera_topic=args.camera_topic,
                          segmentation=not args.no_segmentation,
                          scene_qa=not args.no_scene_qa,
                          camera_source=args.camera_source)
        signals.interruptible = False  # from here on, a signal means: stop in order
        bringup.start()
        print(f'bringup: {", ".join(bringup.nodes)} running (params {params or "defaults"}); '
              'Ctrl-C to stop', flush=True)
        end = time.monotonic() + args.duration if args.duration > 0 else float('inf')
        reason = signals.wait(until=lambda: (time.monotonic() >= end or not rclpy.ok()
                                             or not bringup.thread.is_alive()))
        if reason:
            print(f'bringup: {reason}: answering pending requests, stopping', flush=True)
    except KeyboardInterrupt:  # a signal while the nodes were starting
        pass
    except Exception as exc:  # e.g. a bad value in the YAML: one clear line, exit code 1
        print(f'bringup: failed to start: {exc}', file=sys.stderr)
        code = 1
    finally:
        signals.interruptible = False
        if bringup is not None:
            bringup.stop()
        rclpy.try_shutdown()
        error = bringup.thread.error if bringup is not None else None
        bringup = None
        release_dds()
    if error is not None:
        raise error  # a callback raised: as spin() would have
    return code


def main(argv=None):
    """Entry point of `ros2 run bluelm_ros bringup`."""
    from rclpy.utilities import remove_ros_args
    parser = argparse.ArgumentParser(prog='bringup', description=__doc__.splitlines()[0])
    add_arguments(parser)
    code = run(parser.parse_args(remove_ros_args(argv if argv is not None
                                                 else sys.argv)[1:]))
    from bluelm_ros.ros.common import exit_process
    exit_process(code)  # the interpreter's teardown would take another second


if __name__ == '__main__':
    main()

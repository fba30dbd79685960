"""Shared fixtures: ROS 2 isolation, a context per test module, temp model dirs."""
import os
import random
import threading

import pytest

# Each test run gets its own DDS domain on localhost so parallel runs on one machine (a
# session and its CI, or xdist workers) never discover each other.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_DOMAIN_ID', str(random.Random(os.getpid()).randint(1, 101)))


@pytest.fixture(scope='module')
def ros_context():
    """Init rclpy once per module; shut down after its executors are stopped."""
    rclpy = pytest.importorskip('rclpy')
    from bluelm_ros.ros.common import release_dds
    rclpy.init()
    try:
        yield rclpy
    finally:
        rclpy.try_shutdown()
        release_dds()  # else each module's DDS participant keeps its /dev/shm segments


class SpinThread:
    """A MultiThreadedExecutor spinning in a background thread, stopped cleanly."""

    def __init__(self, *nodes, num_threads=4):
        from rclpy.executors import MultiThreadedExecutor
        self.executor = MultiThreadedExecutor(num_threads=num_threads)
        for node in nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def add(self, node):
        self.executor.add_node(node)

    def stop(self):
        # Stopping the executor and joining its thread before rclpy shutdown avoids the
        # "terminate called without an active exception" abort seen with the wheels.
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)


@pytest.fixture
def spin(ros_context):
    """Start executors for nodes; stop them at teardown."""
    spinners = []

    def start(*nodes, num_threads=4):
        s = SpinThread(*nodes, num_threads=num_threads)
        spinners.append(s)
        return s

    yield start
    for s in spinners:
        s.stop()


@pytest.fixture(scope='session')
def tiny_vlm_bundle(tmp_path_factory):
    """A random-weight BlueLM-V bundle (configs/tiny-test.json): INT8 vision, INT4 decoder.

    Answers are gibberish but every graph, the tokenizer and the bundle checks are real.
    Built once per test session (a few seconds; needs torch + onnx, the dev extra).
    """
    pytest.importorskip('torch')
    pytest.importorskip('onnx')
    from bluelm_ros.tools.vlm.configs import load_config
    from bluelm_ros.tools.vlm.export import ExportOptions, export_bundle, random_model
    out = str(tmp_path_factory.mktemp('tiny_vlm_bundle'))
    export_bundle(random_model(load_config('tiny-test')), out,
                  ExportOptions(vision=('int8',), decoder=('int4',)))
    return out

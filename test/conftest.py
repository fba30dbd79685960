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
    rclpy.init()
    try:
        yield rclpy
    finally:
        rclpy.try_shutdown()


class SpinThread:
    """A MultiThreadedExecutor spinning in a background thread, stopped cleanly."""

    def __init__(self, *nodes):
        from rclpy.executors import MultiThreadedExecutor
        self.executor = MultiThreadedExecutor(num_threads=4)
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

    def start(*nodes):
        s = SpinThread(*nodes)
        spinners.append(s)
        return s

    yield start
    for s in spinners:
        s.stop()

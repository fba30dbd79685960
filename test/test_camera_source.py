"""The demo camera: image folder, video file and synthetic sources, encodings, bad sources."""
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from bluelm_ros.ros import image_codec  # noqa: E402
from bluelm_ros.ros.camera_source_node import CameraSourceNode, load_frames  # noqa: E402
from bluelm_ros.data.synthetic import render_scene  # noqa: E402

WAIT = 30.0
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                      reliability=ReliabilityPolicy.RELIABLE)


class Inbox:
    def __init__(self):
        self.msgs = []
        self._lock = threading.Lock()

    def __call__(self, msg):
        with self._lock:
            self.msgs.append(msg)


def wait_until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def camera(spin):
    """Factory: camera(ns, **params) -> (node, probe, raw inbox, compressed inbox)."""
    made = []

    def make(ns, **params):
        params.setdefault('reliable', True)
        node = CameraSourceNode('cam', namespace=f'/{ns}', parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        probe = rclpy.create_node('cam_probe', namespace=f'/{ns}')
        raw, comp = Inbox(), Inbox()
        probe.create_subscription(Image, 'image', raw, RELIABLE)
        probe.create_subscription(CompressedImage, 'image/compressed', comp, RELIABLE)
        probe_spin = spin(probe)
        # the node's timer only runs once it spins: start it when the probe listens
        assert wait_until(lambda: node.pub.get_subscription_count() > 0)
        made.append((probe_spin, spin(node), node, probe))
        return node, probe, raw, comp

    yield make
    for probe_spin, node_spin, node, probe in made:
        node_spin.stop()
        probe_spin.stop()
        node.destroy_node()
        probe.destroy_node()


def _images(n, h=48, w=64):
    return [render_scene(30 + i, h, w).image for i in range(n)]


def test_folder_source_cycles_its_images_and_stops_after_max_frames(camera, tmp_path):
    images = _images(2)
    for i, img in enumerate(images):
        cv2.imwrite(str(tmp_path / f'{i:02d}.png'), img[:, :, ::-1])
    (tmp_path / 'notes.txt').write_text('not an image')
    node, _, raw, _ = camera('cam_folder', source=str(tmp_path), rate=20.0, max_frames=3,
                             frame_id='front')
    assert wait_until(lambda: len(raw.msgs) >= 3)
    time.sleep(0.3)
    assert len(raw.msgs) == 3 and node.sent == 3  # then it stops
    for msg, expect in zip(raw.msgs, [images[0], images[1], images[0]]):
        arr, order = image_codec.image_to_numpy(msg)
        assert msg.encoding == 'rgb8' and msg.header.frame_id == 'front'
        np.testing.assert_array_equal(arr, expect)
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in raw.msgs]
    assert stamps == sorted(stamps) and stamps[0] > 0


@pytest.mark.parametrize('encoding', ['bgr8', 'mono8'])
def test_synthetic_source_encodings_and_compressed_copy(camera, encoding):
    node, _, raw, comp = camera(f'cam_{encoding}', source='synthetic', width=80, height=60,
                                cache_frames=2, encoding=encoding, publish_compressed=True,
                                rate=20.0, max_frames=2)
    assert wait_until(lambda: len(raw.msgs) >= 2 and len(comp.msgs) >= 2)
    rgb = node.frames[0]
    assert rgb.shape == (60, 80, 3)
    arr, order = image_codec.image_to_numpy(raw.msgs[0])
    assert raw.msgs[0].encoding == encoding
    if encoding == 'bgr8':
        np.testing.assert_array_equal(arr[:, :, ::-1], rgb)
    else:
        np.testing.assert_array_equal(arr, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    jpeg, _ = image_codec.compressed_to_numpy(comp.msgs[0])
    assert jpeg.shape[:2] == (60, 80)
    assert comp.msgs[0].header.stamp == raw.msgs[0].header.stamp


def test_compressed_copy_follows_the_image_remap(spin):
    # image_transport convention (what the nodes subscribe to with input_type compressed):
    # remapping `image` moves the JPEG copy to '<remapped>/compressed' too.
    node = CameraSourceNode('cam', namespace='/cam_remap', cli_args=[
        '--ros-args', '-r', 'image:=/cam_remap/front/image_raw'], parameter_overrides=[
        Parameter('publish_compressed', value=True), Parameter('reliable', value=True),
        Parameter('width', value=32), Parameter('height', value=24),
        Parameter('rate', value=20.0), Parameter('cache_frames', value=1)])
    probe = rclpy.create_node('cam_remap_probe')
    comp = Inbox()
    probe.create_subscription(CompressedImage, '/cam_remap/front/image_raw/compressed', comp,
                              RELIABLE)
    spinners = [spin(probe), spin(node)]
    try:
        assert node.pub.topic_name == '/cam_remap/front/image_raw'
        assert node.pub_c.topic_name == '/cam_remap/front/image_raw/compressed'
        assert wait_until(lambda: len(comp.msgs) >= 1)
    finally:
        for s in spinners:
            s.stop()
        node.destroy_node()
        probe.destroy_node()


def test_video_source(tmp_path):
    images = _images(4, 64, 96)
    path = str(tmp_path / 'clip.avi')
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), 10, (96, 64))
    if not writer.isOpened():
        pytest.skip('OpenCV cannot write MJPG video here')
    for img in images:
        writer.write(img[:, :, ::-1].copy())
    writer.release()
    frames = load_frames(path, 0, 0, 3)
    assert len(frames) == 3
    for got, expect in zip(frames, images):
        assert got.shape == expect.shape
        assert np.abs(got.astype(int) - expect.astype(int)).mean() < 12  # lossy codec


def test_bad_sources_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match='neither'):
        load_frames(str(tmp_path / 'nothing_here'), 64, 48, 2)
    with pytest.raises(ValueError, match='no readable'):
        load_frames(str(tmp_path), 64, 48, 2)
    bad_video = tmp_path / 'bad.mp4'
    bad_video.write_bytes(b'not a video')
    with pytest.raises(ValueError, match='cannot read frames'):
        load_frames(str(bad_video), 64, 48, 2)
    code = 'from bluelm_ros.ros.camera_source_node import main; main()'
    proc = subprocess.run([sys.executable, '-c', code, '--ros-args', '-r', '__ns:=/badcam',
                           '-p', f'source:={tmp_path / "nothing_here"}'],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert 'failed to start' in output and 'nothing_here' in output
    assert 'Traceback' not in output, output

"""A camera for demos and tests: replays synthetic scenes, an image folder or a video.

Publishes sensor_msgs/Image on `image` (remap it) and, optionally, CompressedImage (JPEG)
on `<resolved image>/compressed` (it follows the remap, like image_transport), at a fixed
rate. Frames are decoded or rendered once and cached (up to `cache_frames`; a video
contributes its first `cache_frames` frames), and each JPEG is encoded once, so the publish
timer stays cheap even at high rates.
"""
import glob
import os

import cv2
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from bluelm_ros.ros.image_codec import encode_compressed, numpy_to_image
from bluelm_ros.ros import common

SOURCES_HELP = ("'synthetic' (procedural street scenes), a folder of .png/.jpg images, or "
                'a video file')


def load_frames(source, width, height, count, seed=0):
    """Return a list of RGB uint8 frames from a source (see SOURCES_HELP)."""
    if source == 'synthetic':
        from bluelm_ros.data.synthetic import StreetSceneGenerator
        gen = StreetSceneGenerator(height, width)
        return [gen.render(seed + i).image for i in range(count)]
    if os.path.isdir(source):
        paths = sorted(p for ext in ('png', 'jpg', 'jpeg', 'bmp')
                       for p in glob.glob(os.path.join(source, f'*.{ext}')))[:count]
        frames = [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]
        frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames if f is not None]
        if not frames:
            raise ValueError(f'no readable .png/.jpg/.bmp images in {source}')
        return frames
    if os.path.isfile(source):
        cap = cv2.VideoCapture(source)
        frames = []
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        cap.release()
        if not frames:
            raise ValueError(f'cannot read frames from video {source}')
        return frames
    raise ValueError(f'source {source!r} is neither {SOURCES_HELP}')


class CameraSourceNode(Node):
    """Publish frames from a source at a fixed rate (a stand-in camera driver)."""

    def __init__(self, node_name='camera_source', **kwargs):
        super().__init__(node_name, **kwargs)
        p = common.declare_param
        self.source = p(self, 'source', 'synthetic', f'Frames to publish: {SOURCES_HELP}.')
        self.rate = p(self, 'rate', 5.0, 'Publish rate in Hz.', value_range=(0.1, 1000.0))
        w = p(self, 'width', 640, 'Frame width for synthetic scenes.', value_range=(16, 4096))
        h = p(self, 'height', 480, 'Frame height for synthetic scenes.',
              value_range=(16, 4096))
        n = p(self, 'cache_frames', 8, 'Frames to load/render and cycle through.',
              value_range=(1, 10000))
        seed = p(self, 'seed', 0, 'First synthetic scene seed.', value_range=(0, 2**31 - 1))
        self.encoding = p(self, 'encoding', 'rgb8', 'Raw image encoding.',
                          choices=('rgb8', 'bgr8', 'mono8'))
        self.frame_id = p(self, 'frame_id', 'camera', 'header.frame_id of the frames.')
        self.compressed = p(self, 'publish_compressed', False,
                            'Also publish image/compressed (jpeg).')
        self.max_frames = p(self, 'max_frames', 0, 'Stop after N frames (0 = forever).',
                            value_range=(0, 2**31 - 1))
        self.reliable = p(self, 'reliable', False,
                          'Publish reliable (default: sensor-data best effort).')
        self.frames = load_frames(self.source, w, h, n, seed)
        qos = 10 if self.reliable else qos_profile_sensor_data
        self.pub = self.create_publisher(Image, 'image', qos)
        # image_transport convention, as the nodes subscribe: '<resolved image>/compressed',
        # so one remap of `image` moves both (a plain 'image/compressed' would not follow it).
        self.pub_c = (self.create_publisher(
            CompressedImage, self.resolve_topic_name('image') + '/compressed', qos)
            if self.compressed else None)
        self.sent = 0
        self._compressed = {}  # frame index -> (format, jpeg bytes), encoded once
        self.timer = self.create_timer(1.0 / self.rate, self._tick)
        self.get_logger().info(
            f'publishing {len(self.frames)} frames from {self.source} at {self.rate} Hz '
            f'on {self.pub.topic_name}')

    def current_frame(self):
        """Return the RGB frame that the next tick publishes."""
        return self.frames[self.sent % len(self.frames)]

    def _tick(self):
        try:
            self._publish_next()
        except Exception:
            # Ctrl-C: rclpy's signal handler invalidates the context while a tick may be
            # publishing ("publisher's context is invalid"); that frame is simply not sent.
            if self.context.ok():
                raise

    def _publish_next(self):
        if self.max_frames and self.sent >= self.max_frames:
            self.timer.cancel()
            return
        rgb = self.current_frame()
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.frame_id)
        if self.encoding == 'bgr8':
            arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        elif self.encoding == 'mono8':
            arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        else:
            arr = rgb
        self.pub.publish(numpy_to_image(arr, self.encoding, header))
        if self.pub_c is not None:
            index = self.sent % len(self.frames)
            if index not in self._compressed:
                jpeg = encode_compressed(rgb, 'jpeg')
                self._compressed[index] = (jpeg.format, jpeg.data)
            fmt, data = self._compressed[index]
            self.pub_c.publish(CompressedImage(header=header, format=fmt, data=data))
        self.sent += 1


def main(args=None):
    """Entry point of `ros2 run bluelm_ros camera_source_node`."""
    common.exit_process(common.run_node(CameraSourceNode, args=args))


if __name__ == '__main__':
    main()

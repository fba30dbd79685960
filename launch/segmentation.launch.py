"""Launch only the segmentation_node on a camera.

    ros2 launch bluelm_ros segmentation.launch.py camera_topic:=/camera/image_raw
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('bluelm_ros')
    return LaunchDescription([
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'bluelm_ros.yaml')),
        DeclareLaunchArgument('camera_topic', default_value='/camera/image_raw'),
        DeclareLaunchArgument('namespace', default_value=''),
        Node(package='bluelm_ros', executable='segmentation_node', name='segmentation_node',
             namespace=LaunchConfiguration('namespace'),
             parameters=[LaunchConfiguration('params_file')],
             remappings=[('image', LaunchConfiguration('camera_topic'))]),
    ])

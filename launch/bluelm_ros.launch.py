"""Bring up segmentation + scene QA on a camera (and, optionally, the demo camera).

    ros2 launch bluelm_ros bluelm_ros.launch.py camera_topic:=/camera/image_raw
    ros2 launch bluelm_ros bluelm_ros.launch.py params_file:=/path/low_power.yaml \
        namespace:=robot1 use_camera_source:=true

The same YAML drives `bluelm-ros bringup --params ...` (one process, no launch needed).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('bluelm_ros')
    params = LaunchConfiguration('params_file')
    camera = LaunchConfiguration('camera_topic')
    ns = LaunchConfiguration('namespace')
    return LaunchDescription([
        # Best-effort frames > 512 KB are dropped between processes by Fast DDS's default
        # shared-memory segment (docs/segmentation-node.md); this profile enlarges it.
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config',
                                                         'fastdds_large_frames.xml')),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE',
                               LaunchConfiguration('fastdds_profile')),
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'bluelm_ros.yaml'),
                              description='Parameter YAML (/**/<node>: ros__parameters)'),
        DeclareLaunchArgument('camera_topic', default_value='/camera/image_raw',
                              description='sensor_msgs/Image topic of the camera'),
        DeclareLaunchArgument('namespace', default_value='', description='Node namespace'),
        DeclareLaunchArgument('use_segmentation', default_value='true'),
        DeclareLaunchArgument('use_scene_qa', default_value='true'),
        DeclareLaunchArgument('use_camera_source', default_value='false',
                              description='Publish synthetic frames on camera_topic'),
        Node(package='bluelm_ros', executable='camera_source_node', name='camera_source',
             namespace=ns, parameters=[params], remappings=[('image', camera)],
             condition=IfCondition(LaunchConfiguration('use_camera_source'))),
        Node(package='bluelm_ros', executable='segmentation_node', name='segmentation_node',
             namespace=ns, parameters=[params], remappings=[('image', camera)],
             condition=IfCondition(LaunchConfiguration('use_segmentation'))),
        Node(package='bluelm_ros', executable='scene_qa_node', name='scene_qa_node',
             namespace=ns, parameters=[params],
             remappings=[('image', camera), ('scene_context', 'segmentation_node/class_stats')],
             condition=IfCondition(LaunchConfiguration('use_scene_qa'))),
    ])

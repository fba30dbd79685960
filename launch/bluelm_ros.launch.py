"""Bring up segmentation + scene QA on a camera (and, optionally, the demo camera).

    ros2 launch bluelm_ros bluelm_ros.launch.py camera_topic:=/camera/image_raw
    ros2 launch bluelm_ros bluelm_ros.launch.py params_file:=/path/low_power.yaml \
        namespace:=robot1 use_camera_source:=true
    ros2 launch bluelm_ros bluelm_ros.launch.py --show-args

Everything runs in one scoped group: the arguments, FASTDDS_DEFAULT_PROFILES_FILE and the
launch configurations set here end with it, so a parent launch file that includes this one
keeps its own environment and configurations (docs/launch.md). segmentation.launch.py and
scene_qa.launch.py include this file with one node switched off.

The same YAML drives `bluelm-ros bringup --params ...` (one process, no launch needed).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, GroupAction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

from bluelm_ros.ros.common import fastdds_profiles_variable

# Fast DDS 3 (Kilted on) reads FASTDDS_DEFAULT_PROFILES_FILE, Fast DDS 2 (Humble, Jazzy)
# only FASTRTPS_DEFAULT_PROFILES_FILE; setting both on Kilted loads the file twice.
PROFILE_VAR = fastdds_profiles_variable()


def _arguments(shipped_params, shipped_profile):
    return [
        DeclareLaunchArgument(
            'params_file', default_value=shipped_params,
            description='Parameter YAML (keys /**/<node name>: ros__parameters) layered over '
                        'the shipped config/bluelm_ros.yaml: its keys win, the others keep '
                        'the shipped values. Default: the shipped file itself.'),
        DeclareLaunchArgument(
            'camera_topic', default_value='camera/image_raw',
            description='sensor_msgs/Image topic of the camera. A relative name resolves in '
                        'the namespace (robot1 -> /robot1/camera/image_raw).'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='Namespace of every node started here (and of a relative '
                        'camera_topic); empty: the root namespace.'),
        DeclareLaunchArgument(
            'use_segmentation', default_value='true',
            description='Start segmentation_node (true/false).'),
        DeclareLaunchArgument(
            'use_scene_qa', default_value='true',
            description='Start scene_qa_node (true/false).'),
        DeclareLaunchArgument(
            'use_camera_source', default_value='false',
            description='Start the demo camera (camera_source_node: synthetic street '
                        'scenes) publishing on camera_topic (true/false).'),
        # Best-effort frames bigger than Fast DDS's default 512 KB shared-memory segment
        # are lost between processes (docs/segmentation-node.md); the shipped profile fits
        # 4K. A profile the environment already names (a parent's, a multi-host one) wins.
        DeclareLaunchArgument(
            'fastdds_profile',
            default_value=EnvironmentVariable(PROFILE_VAR, default_value=shipped_profile),
            description='Fast DDS XML profile for the nodes started here '
                        f'({PROFILE_VAR}). Default: the one already set in '
                        'the environment, else the shipped config/fastdds_large_frames.xml '
                        '(frames up to 4K bgr8). Give the camera driver the same file.'),
    ]


def generate_launch_description():
    share = get_package_share_directory('bluelm_ros')
    shipped_params = os.path.join(share, 'config', 'bluelm_ros.yaml')
    shipped_profile = os.path.join(share, 'config', 'fastdds_large_frames.xml')
    # Shipped defaults first, the user's file second: later files override earlier ones.
    params = [shipped_params, LaunchConfiguration('params_file')]
    camera = LaunchConfiguration('camera_topic')
    ns = LaunchConfiguration('namespace')
    profile = LaunchConfiguration('fastdds_profile')
    return LaunchDescription([GroupAction(scoped=True, forwarding=True, actions=[
        *_arguments(shipped_params, shipped_profile),
        SetEnvironmentVariable(PROFILE_VAR, profile),
        # The shipped profile's writer/reader memory policy (a huge frame's buffers are freed
        # after it) is read only with this variable; another profile keeps rmw's defaults.
        SetEnvironmentVariable(
            'RMW_FASTRTPS_USE_QOS_FROM_XML', '1', condition=IfCondition(PythonExpression(
                ["'", profile, "' == '", shipped_profile, "'"]))),
        Node(package='bluelm_ros', executable='camera_source_node', name='camera_source',
             namespace=ns, parameters=params, remappings=[('image', camera)],
             output='screen', emulate_tty=True,
             condition=IfCondition(LaunchConfiguration('use_camera_source'))),
        Node(package='bluelm_ros', executable='segmentation_node', name='segmentation_node',
             namespace=ns, parameters=params, remappings=[('image', camera)],
             output='screen', emulate_tty=True,
             condition=IfCondition(LaunchConfiguration('use_segmentation'))),
        Node(package='bluelm_ros', executable='scene_qa_node', name='scene_qa_node',
             namespace=ns, parameters=params,
             remappings=[('image', camera), ('scene_context', 'segmentation_node/class_stats')],
             output='screen', emulate_tty=True,
             condition=IfCondition(LaunchConfiguration('use_scene_qa'))),
    ])])

"""Only the scene_qa_node: bluelm_ros.launch.py with `use_segmentation:=false`.

    ros2 launch bluelm_ros scene_qa.launch.py camera_topic:=/camera/image_raw

It takes every argument of bluelm_ros.launch.py (params_file, camera_topic, namespace,
use_camera_source, fastdds_profile, ...; `--show-args` lists them) and sets its Fast DDS
profile the same way.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import GroupAction, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource


def generate_launch_description():
    main = os.path.join(get_package_share_directory('bluelm_ros'), 'launch',
                        'bluelm_ros.launch.py')
    # Scoped: launch sets an include's arguments (use_segmentation) in the including scope, so
    # without the group they would reach a parent's later actions. Forwarding keeps the
    # command-line arguments flowing in (forwarding=False would drop them).
    return LaunchDescription([GroupAction(scoped=True, forwarding=True, actions=[
        IncludeLaunchDescription(PythonLaunchDescriptionSource(main),
                                 launch_arguments={'use_segmentation': 'false'}.items())])])

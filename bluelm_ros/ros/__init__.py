"""ROS 2 adapters: the nodes, their parameters, QoS, lifecycle, diagnostics and messages.

Everything that knows rclpy or a message type lives here, and only that: models, frames
and answers are handled by bluelm_ros.runtime. Imports runtime and data, never tools.
"""

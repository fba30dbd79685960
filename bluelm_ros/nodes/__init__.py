"""ROS 2 nodes of bluelm_ros (segmentation, scene QA) and the helpers they share."""

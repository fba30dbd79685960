"""What runs on the robot: numpy + onnxruntime + OpenCV + tokenizers, nothing else.

The segmenter, the VLM engine and the scene-QA service, with ONNX Runtime session set-up,
image conversion and the shipped-model paths. No torch, no rclpy, and no import from
the rest of bluelm_ros (test/test_import_rules.py checks every file), so this folder
alone is what an ARM robot needs besides its ROS install.
"""

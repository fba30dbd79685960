"""Pure-Python install of bluelm_ros (models, export, benchmarks, CLI) without ROS.

The ROS 2 build is CMakeLists.txt (colcon, ament_cmake): it generates the interfaces and
merges this same package into the generated one. See docs/install-paths.md.
"""
from setuptools import find_packages, setup

setup(
    name='bluelm-ros',
    version='0.1.0',
    description='DSNet segmentation and BlueLM-V scene QA on ONNX Runtime (library + CLI)',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['bluelm_ros', 'bluelm_ros.*']),
    package_data={'bluelm_ros': ['models/*/*', 'tools/vlm/configs/*.json']},
    install_requires=[
        'numpy', 'onnxruntime', 'opencv-python-headless', 'tokenizers', 'pyyaml', 'tqdm',
        'jinja2',
    ],
    extras_require={
        'train': ['torch==2.13.0', 'onnx', 'onnxscript', 'safetensors', 'matplotlib'],
        'dev': ['torch==2.13.0', 'onnx', 'onnxscript', 'safetensors', 'transformers>=5,<6',
                'pytest', 'pytest-timeout', 'flake8', 'pydocstyle', 'lxml', 'matplotlib',
                'psutil', 'scikit-image'],
    },
    entry_points={'console_scripts': ['bluelm-ros = bluelm_ros.cli:main']},
)

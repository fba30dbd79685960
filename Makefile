# The two commands of README.md: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
ENV := source .ws/env.sh
PYTEST_ARGS ?=

# What `make test-jazzy` runs against the ROS 2 Jazzy wheels: everything that talks ROS
# (nodes, interfaces, bringup and launch checks, the codec, the two-host test).
JAZZY_TESTS ?= test/test_interfaces.py test/test_image_codec.py test/test_camera_source.py \
	test/test_segmentation_node.py test/test_scene_qa_node.py test/test_bringup.py \
	test/test_multi_host.py

.PHONY: setup demo test bench test-arm64 test-jazzy clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(ENV) && bluelm-ros demo --out demo_output

test: setup
	@$(ENV) && pytest -q -p no:cacheprovider $(PYTEST_ARGS) test

bench: setup
	@$(ENV) && python bench/run_all.py

test-arm64:
	@bash scripts/test_arm64.sh

# The ROS tests again on ROS 2 Jazzy (LTS): its own venv and workspace (.ws-jazzy/).
test-jazzy:
	@BLUELM_ROS_DISTRO=jazzy bash scripts/setup.sh
	@source .ws-jazzy/env.sh && pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(JAZZY_TESTS)

clean:
	rm -rf .ws .ws-jazzy demo_output

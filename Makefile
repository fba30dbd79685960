# The two commands of README.md: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
ENV := source .ws/env.sh
PYTEST_ARGS ?=

.PHONY: setup demo test bench test-arm64 clean

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

clean:
	rm -rf .ws demo_output

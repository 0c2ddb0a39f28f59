# The test command: make test. Everything it needs is installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck pytest demo bench clean deploy-tools deploy-check \
	test-container

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py streamlstm/_kernels.c constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build through the constraints file.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# deploy-tools installs what tests/deploy needs (and runs deploy/'s static checks)
# before pytest collects every test, tests/deploy and the `cluster` ones included.
test: lint typecheck deploy-tools pytest

demo: $(STAMP)
	$(BIN)/streamlstm demo

bench: $(STAMP)
	$(BIN)/streamlstm bench engine

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# deploy/: installs its tools (deploy/.tools, Debian's prometheus), runs the
# static checks, then the tests against a live Prometheus. See deploy/README.md.
deploy-tools: $(STAMP)
	bash deploy/check.sh

deploy-check: deploy-tools
	$(BIN)/pytest tests/deploy -v

# The serving image built and run (tests/deploy/test_container.py, marker `deploy`):
# deploy/container/dockerd.sh installs docker.io and debootstrap and starts dockerd
# (needs root), the test builds the debootstrap base image (cached) and the image,
# then serves on Apache Kafka in a container; dockerd.sh stop removes the test's
# containers and stops the dockerd it started, whatever the outcome. `make test`
# runs the same test (tests/deploy is in the suite; its fixture starts dockerd too).
test-container: $(STAMP)
	trap 'bash deploy/container/dockerd.sh stop' EXIT; \
	bash deploy/container/dockerd.sh start \
	&& $(BIN)/pytest -m deploy tests/deploy/test_container.py -v -s $(PYTEST_ARGS)

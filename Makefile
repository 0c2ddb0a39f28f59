# The test command: make test. Everything it needs is installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit lint typecheck pytest test-sanitize demo bench clean deploy-tools \
	deploy-check test-container

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py streamlstm/_kernels.c consumers/codec/_codec.c constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Built against the venv's own OpenBLAS (no build isolation): the kernels' rpath then
	# names a folder that stays (an isolated build's is deleted after the install).
	$(BIN)/pip install --quiet --upgrade -c constraints.txt 'setuptools>=77' 'scipy-openblas32>=0.3.27'
	$(BIN)/pip install --quiet -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The tests that need no broker, no Java and no deploy tools (marker `unit`, set by
# tests/conftest.py): a few minutes on two cores. `make test` runs these and the rest.
test-unit: $(STAMP)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

# deploy-tools installs what tests/deploy needs (and runs deploy/'s static checks)
# before pytest collects every test, tests/deploy and the `cluster` ones included.
test: lint typecheck deploy-tools pytest test-sanitize

# The codec (consumers/codec/_codec.c) parses untrusted Kafka bytes: its tests run again
# against a build with AddressSanitizer and UBSan, in its own folder (the installed
# build is left alone), loaded through STREAMLSTM_CODEC_PATH; so do the tests of live
# quality's C update (streamlstm/_quality.c, which writes the store's rows at the slots
# it is given), loaded through STREAMLSTM_QUALITY_PATH. The interpreter is not
# instrumented, so the ASan runtime is preloaded; PYTHONMALLOC=malloc lets ASan see the
# codec's PyMem buffers. Any report aborts the run (abort_on_error, halt_on_error) and
# is written to $(SAN_DIR)/report.* (pytest's capture would swallow it from stderr):
# the target fails on a report file as on a failed test.
SAN_CC ?= gcc
SAN_DIR := build/sanitize
SAN_FLAGS := -O1 -g -fsanitize=address,undefined,float-cast-overflow \
	-fno-omit-frame-pointer -fno-sanitize-recover=undefined,float-cast-overflow
SAN_TESTS := tests/consumers/test_codec_native.py tests/consumers/test_codec.py \
	tests/consumers/test_fuzz_codec.py tests/consumers/test_wire_hostile.py \
	tests/streamlstm/test_quality_native.py tests/streamlstm/test_quality.py

test-sanitize: $(STAMP)
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	$(SAN_CC) $(SAN_FLAGS) -Wall -fPIC -shared \
		-I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		consumers/codec/_codec.c -lm -o $(SAN_DIR)/_codec.so
	$(SAN_CC) $(SAN_FLAGS) -ffp-contract=off -Wall -fPIC -shared \
		-I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		streamlstm/_quality.c -lm -o $(SAN_DIR)/_quality.so
	so="$(CURDIR)/$(SAN_DIR)/_codec.so"; report="$(CURDIR)/$(SAN_DIR)/report"; \
	qso="$(CURDIR)/$(SAN_DIR)/_quality.so"; \
	export STREAMLSTM_CODEC_PATH="$$so" STREAMLSTM_QUALITY_PATH="$$qso" PYTHONMALLOC=malloc \
		PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
		LD_PRELOAD="$$($(SAN_CC) -print-file-name=libasan.so) $$($(SAN_CC) -print-file-name=libubsan.so)" \
		ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$$report" \
		UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$$report"; \
	loaded=$$($(BIN)/python -c 'from streamlstm.consumers.codec.native import codec_module; print(codec_module().__file__)'); \
	echo "codec under test: $$loaded"; \
	test "$$loaded" = "$$so" || { echo "test-sanitize: not the sanitized build"; exit 1; }; \
	loaded=$$($(BIN)/python -c 'from streamlstm.quality.native import quality_lib, loaded_path; quality_lib(); print(loaded_path())'); \
	echo "quality update under test: $$loaded"; \
	test "$$loaded" = "$$qso" || { echo "test-sanitize: not the sanitized quality build"; exit 1; }; \
	$(BIN)/python -m pytest -p no:cacheprovider $(SAN_TESTS); status=$$?; \
	if ls "$$report".* >/dev/null 2>&1; then \
		cat "$$report".*; echo "test-sanitize: a sanitizer report (above)"; exit 1; fi; \
	exit $$status

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

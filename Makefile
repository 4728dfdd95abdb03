# The two commands of the README:
#   make run   - set everything up (first time: ~5 min to build llama.cpp with RPC) and
#                start the demo: a head + 2 local workers serving SmolLM2 on :8080
#   make test  - set everything up and run the whole test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.anyway-ready
ARGS   ?=

.PHONY: run test setup lint clean bench bench-recovery bench-scale bench-spec bench-throughput image lock

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/anyway up $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

# Benchmarks (not part of make test): make bench ARGS="--hetero" or ARGS="--lan"
$(VENV)/.anyway-bench: $(STAMP)
	PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=test,bench bash scripts/bootstrap.sh
	touch $@

bench: $(VENV)/.anyway-bench
	$(VENV)/bin/python -m bench.run $(ARGS)

# Recovery from a killed worker (detection, re-plan, stream gap, cold vs cached load)
bench-recovery: $(STAMP)
	$(VENV)/bin/python -m bench.recovery $(ARGS)

# GB-class models over a shaped LAN (network namespaces + tc tbf; as root): docs/SCALE.md
bench-scale: $(VENV)/.anyway-bench
	$(VENV)/bin/python -m bench.scale $(ARGS)

# Speculative decoding over the shaped LAN (as root): docs/BENCHMARKS.md, its speculative section
bench-spec: $(VENV)/.anyway-bench
	$(VENV)/bin/python -m bench.speculative $(ARGS)

# Concurrent clients with lanes off and on (issue 15): make bench-throughput ARGS="--lan --workers 3"
bench-throughput: $(VENV)/.anyway-bench
	$(VENV)/bin/python -m bench.throughput $(ARGS)

# The hash-pinned lock of everything installed on the boxes (the product's dependencies and
# llama-cpp-python, transitively), made by pip-tools from pyproject.toml. Ansible and the image
# build install with `pip --require-hashes` from it. Re-run after changing a dependency.
LOCK := ansible/roles/anyway_common/files/requirements.lock
PIP_TOOLS_VERSION := 7.6.2
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip -q --disable-pip-version-check install "pip-tools==$(PIP_TOOLS_VERSION)"
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra llama \
	  --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

clean:
	-bash images/build.sh clean
	rm -rf --one-file-system $(VENV) .venv-lock .pytest_cache build *.egg-info

# Appliance images (docs/IMAGES.md), as root, not part of make test:
#   make image       - Debian root fs, raw disk image and OCI image in build/images
#                      (inputs.txt, SHA256SUMS); caches in ~/.cache/anyway/images
#   make image-test  - make image, then the image tests (pytest -m image; qemu boot included)
.PHONY: image-test
image:
	bash images/build.sh build

image-test: image $(STAMP)
	bash images/build.sh deps --test
	ANYWAY_IMAGE_TESTS=1 $(VENV)/bin/python -m pytest -m image tests/test_images.py $(ARGS)

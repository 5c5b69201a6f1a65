# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
#
# TORCH selects the torch build. The default pins the CPU wheel that CI machines carry on
# disk; on a GPU machine, install your CUDA build of torch into .venv first (or pass
# TORCH=torch) -- anything >= 2.4 works.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

# The main job: a small GPT trained with DP-SGD on the Wikipedia excerpt that ships with
# gensim, next to a non-private run (a few minutes on a CPU), then the accounting report.
demo: setup
	$(BIN)/python experiments/train_dp_gpt.py --quick
	$(BIN)/dpfa accountants --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000 --delta 1e-5
	$(BIN)/python experiments/accounting_report.py --quick --out experiments/results/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

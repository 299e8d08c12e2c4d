# `make run`: set up .venv and run the main job. `make test`: set up with dev tools and run the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# The main job: the baseline and every method that exists on mnist5k, one seed, a few epochs.
RUN_EPOCHS ?= 3
RUN_OUT    ?= runs/main

.PHONY: run test setup setup-dev bench-overhead clean

run: setup
	$(BIN)/haet bench --task mnist5k --methods all --seeds 1 --epochs $(RUN_EPOCHS) --out $(RUN_OUT) --overwrite
	rm -rf $(RUN_OUT)/challenge-baseline $(RUN_OUT)/challenge-fast   # the previous main job's, like --overwrite above
	$(BIN)/haet challenge --task mnist5k --recipe baseline --time-budget 5 --runs 1 --out $(RUN_OUT)/challenge-baseline --leaderboard $(RUN_OUT)/leaderboard.md
	$(BIN)/haet challenge --task mnist5k --recipe fast --time-budget 5 --runs 1 --out $(RUN_OUT)/challenge-fast --leaderboard $(RUN_OUT)/leaderboard.md

test: setup-dev
	$(BIN)/python -m pytest -n 2 tests

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# torch first, pinned, so that pip never fetches a multi-GB CUDA build for an open range.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

bench-overhead: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache

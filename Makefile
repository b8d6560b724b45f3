# Two commands for a newcomer: `make train` (the embedded default, end to end) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geovlm-installed

.PHONY: train test lint bench-cpu gpu-check clean

$(STAMP): setup.py
	@# WordNet 3.0 for NLTK's METEOR (Debian packages; NLTK corpora cannot be downloaded here).
	@if [ ! -d /usr/share/wordnet ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends \
			wordnet-base wordnet-sense-index >/dev/null; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m geovlm.train

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check geovlm tests benchmarks

bench-cpu: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs .pytest_cache

# Everything a newcomer needs: `make run` and `make test` each set up the
# virtual environment first; nothing else is assumed installed but Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SAMPLE := sample/input
OUT := out

.PHONY: setup run run-cloud test bench bench-memory clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(SAMPLE): | $(STAMP)
	$(PY) -m devtools.sample_data $(SAMPLE)

run: $(STAMP) $(SAMPLE)
	$(PY) -m pipeline --input $(SAMPLE) --bucket $(OUT)/bucket \
	    --collection IRB41449 --metadata_output $(OUT)/metadata

run-cloud: $(STAMP) $(SAMPLE)
	$(PY) -m devtools.cloud_demo $(SAMPLE)

bench: $(STAMP)
	bench/setup.sh
	$(PY) bench/run_bench.py

bench-memory: $(STAMP)
	bench/setup.sh
	$(PY) bench/run_bench.py --memory

test: $(STAMP)
	devtools/test_tools.sh
	$(PY) -m pytest -q tests

clean:
	rm -rf $(OUT) sample

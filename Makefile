# Everything a newcomer needs: `make run` and `make test` each set up the
# virtual environment first; nothing else is assumed installed but Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SAMPLE := sample/input
OUT := out

.PHONY: setup run run-cloud test clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(SAMPLE): | $(STAMP)
	$(PY) -m devtools.sample_data $(SAMPLE)

run: $(STAMP) $(SAMPLE)
	$(PY) -m pipeline --input $(SAMPLE) --bucket $(OUT)/bucket \
	    --collection IRB41449 --metadata_output $(OUT)/metadata

run-cloud: $(STAMP) $(SAMPLE)
	$(PY) -m devtools.cloud_demo $(SAMPLE)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(OUT) sample

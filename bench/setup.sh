#!/usr/bin/env bash
# Prepare the benchmark: pigz for the tar|pigz baseline, and bench/.venv for
# corpus.py (it needs pydicom-data, which the pipeline's .venv must not carry).
# Idempotent: does nothing when both are already there.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v pigz >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pigz >/dev/null
fi
if ! .venv/bin/python -c 'import pydicom, data_store, numpy' 2>/dev/null; then
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/pip install -q -r requirements.txt
fi

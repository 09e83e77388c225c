#!/usr/bin/env bash
# What `make test` needs beyond the Python packages: Debian's Chromium, in
# which tests/test_report_page.py renders the report page. Idempotent: does
# nothing when it is already installed.
set -euo pipefail
if ! command -v chromium >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

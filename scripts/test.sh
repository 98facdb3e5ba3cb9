#!/usr/bin/env bash
# Run vmpod's tests: fast unit tests, then tests that boot real VMs.
# Sets the machine up first (idempotent), so it works on a fresh Debian 12 box.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@" tests/unit tests/vm

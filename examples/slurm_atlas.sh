#!/usr/bin/env bash
# An atlas over a SLURM job array: N shards at once (a GPU each), then one job that assembles.
#
#   bash examples/slurm_atlas.sh smollm2-135m-instruct /shared/atlas 4 [more 'headscope atlas' options]
#
# Every job must see OUT (a shared file system) and have headscope installed; give every job the
# same options (--detectors, --config, -k, --n-random, --seed, --no-validate, --device): they key
# the parts. Shard i of N runs the units 'headscope atlas --shard i/N' picks (numbered from 1,
# balanced by each detector's rough cost, the same list on every node) and writes their parts to
# OUT/parts. The assembly starts when every shard has ended (afterany: a shard whose detector failed
# exits 1 with the failure recorded, which the report shows as a sequential run's would; a shard
# that died leaves units missing, which the assembly names with the --only that makes them).
set -euo pipefail
MODEL=${1:-smollm2-135m-instruct}
OUT=${2:-atlas}
N=${3:-4}
shift $(($# < 3 ? $# : 3))
OPTIONS=$(printf '%q ' --model "$MODEL" --out "$OUT" "$@")
shards=$(sbatch --parsable --job-name=atlas-shards --array=1-"$N" --gres=gpu:1 --time=02:00:00 \
    --wrap "headscope atlas $OPTIONS --shard \$SLURM_ARRAY_TASK_ID/$N")
sbatch --job-name=atlas-assemble --dependency=afterany:"$shards" --gres=gpu:1 --time=00:30:00 \
    --wrap "headscope atlas $OPTIONS --assemble"

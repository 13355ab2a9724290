#!/usr/bin/env bash
# The project's checks and benchmarks on CUDA, in one call sized to a short GPU lease:
#   1. the CUDA-only tests (compiled steps captured and replayed as CUDA graphs: eager tokens);
#   2. the served /generate benchmark (bench.served): a real server's single stream, each run
#      right after offline generate() on the service's compiled steps, then 16 streams;
#   3. bench.attention: eager generations at key counts never run before against the same
#      ones run again, per attention backend set (is eager decoding's warm-up per shape?);
#   4. benchmark 1 (speculative vs plain greedy, eager) and 3 (the service under load).
# Each phase gets what is left of GPU_BUDGET_S (default 540 s), so a slow phase cannot starve
# the ones before it of their results. Results land in $OUT (default docs/bench/gpu): each
# benchmark's JSON, and every phase's output in gpu.log (a GPU lease returns few files).
#
#   bash bench/gpu.sh      # from a checkout, with the project's packages and a CUDA torch
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/gpu}
BUDGET=${GPU_BUDGET_S:-540}
mkdir -p "$OUT"
: >"$OUT/gpu.log"
python3 - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", __import__("triton").__version__)
PY
start=$SECONDS
failed=0
phase() {  # phase NAME CAP_S COMMAND...: run with the smaller of CAP_S and what the budget has left
    local name=$1 cap=$2 left=$((BUDGET - (SECONDS - start)))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 20)); then
        echo "bench/gpu.sh: $name skipped, ${left} s of the budget left" | tee -a "$OUT/gpu.log"
        failed=1
        return
    fi
    local t0=$SECONDS
    echo "==> bench/gpu.sh: $name (cap $cap s)" >>"$OUT/gpu.log"
    PYTHONUNBUFFERED=1 timeout "$cap" "$@" 2>&1 | tee -a "$OUT/gpu.log"
    local rc=${PIPESTATUS[0]}
    pkill -f "app.cli serve" && sleep 2  # a server that a timed-out benchmark left behind
    echo "bench/gpu.sh: $name rc=$rc in $((SECONDS - t0)) s (cap $cap s)" | tee -a "$OUT/gpu.log"
    ((rc != 0)) && failed=1
}
phase tests 180 python3 -m pytest -q -p no:cacheprovider -rs tests/decoding/test_compiled.py tests/engine/test_compiled.py -k cuda
phase served 300 python3 -m bench.served --device cuda --rounds 1 --prompts 4 --skip-eager-offline --out "$OUT/served.json"
phase attention 60 python3 -m bench.attention --device cuda --out "$OUT/attention.json"
phase speculative 60 python3 -m app.cli --log-level WARNING bench speculative --device cuda --dtype bfloat16 \
    --prompts 4 --no-compile --out "$OUT/speculative.json"
phase service 90 python3 -m app.cli --log-level WARNING bench service --device cuda --dtype bfloat16 \
    --seconds 10 --new-tokens 64 --out "$OUT/service.json"
echo "bench/gpu.sh: done in $((SECONDS - start)) s (budget $BUDGET s); results in $OUT"
exit $failed

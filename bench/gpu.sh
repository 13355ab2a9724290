#!/usr/bin/env bash
# Benchmarks 1 (speculative vs plain greedy) and 3 (service under load) on CUDA in bfloat16.
# Sized to finish in well under 8 minutes on one GPU. Results land in $OUT (default docs/bench/gpu).
#
#   bash bench/gpu.sh            # needs the project installed (pip install -e .) and a CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/gpu}
mkdir -p "$OUT"
python3 - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
start=$SECONDS
# eager only (--no-compile): compile time on an unknown GPU host would put the 8-minute budget at risk
timeout 240 mtp --log-level WARNING bench speculative --device cuda --dtype bfloat16 --prompts 10 --no-compile \
  --out "$OUT/speculative.json"
timeout 200 mtp --log-level WARNING bench service --device cuda --dtype bfloat16 --seconds 10 --new-tokens 64 \
  --out "$OUT/service.json"
# the served /generate benchmark: a real server's single stream and 16 streams against offline generate()
timeout 150 python3 -m bench.served --device cuda --rounds 1 --prompts 4 --out "$OUT/served.json"
echo "bench/gpu.sh: done in $((SECONDS - start)) s; results in $OUT"

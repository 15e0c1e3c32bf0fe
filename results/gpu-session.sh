#!/bin/bash
# The GPU measurements of the speed work, in one call of about 10 minutes on an H100:
#     OUT=/tmp/gpu bash results/gpu-session.sh
# Writes OUT/log.txt and one bench JSON per setting (copy the eager or fastest one to
# results/bench-GPUNAME.json). Each step has its own time limit, so a slow compile costs only
# its own line; output is line-buffered, so a step that is stopped still shows what it printed.
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
say() { grep --line-buffered -v -i "warn" | tee -a "$L"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())"
  git rev-parse --short HEAD 2>/dev/null; nproc; } 2>&1 | say
bench() {   # NAME SECONDS FLAGS...: bench.py with bf16 and the host synchronisations recorded
    local name=$1 limit=$2 start=$SECONDS; shift 2
    timeout "$limit" python3 bench.py --amp bf16 --sync-debug --json "$OUT/$name.json" "$@" 2>&1 | say
    echo "$name: $((SECONDS - start)) s" | say
}
bench eager 60 --channels-last                                       # about 30 s
timeout 40 python3 bench.py --part encoder --amp bf16 2>&1 | say     # about 20 s
bench compiled 300 --channels-last --compile --no-parts               # compiles three configurations
start=$SECONDS                                                        # the compiled step against eager
timeout 120 python3 -m pytest -q -x test_all.py -k "compiled_step or cuda" -p no:cacheprovider 2>&1 | tail -5 | say
echo "GPU tests: $((SECONDS - start)) s" | say
bench cuda-graphs 100 --channels-last --compile reduce-overhead --no-parts

#!/bin/bash
# The GPU measurements, each part one call of at most 10 minutes on an H100 or H200:
#     OUT=/tmp/gpu bash results/gpu-session.sh default    # `python train.py` end to end, stopped once, resumed (3-5 min)
#     OUT=/tmp/gpu bash results/gpu-session.sh            # speed: ResNet-18, eager, compiled, CUDA graphs
#     OUT=/tmp/gpu bash results/gpu-session.sh recipe     # the paper's recipe end to end (about 5 minutes)
#     OUT=/tmp/gpu bash results/gpu-session.sh study      # the object-scale study (144, 96, 56 px; 8 min)
# Writes OUT/log.txt and one bench JSON per setting (copy the eager or fastest one to
# results/bench-GPUNAME.json). Each step has its own time limit, so a slow compile costs only
# its own line; output is line-buffered, so a step that is stopped still shows what it printed.
OUT=${OUT:-/tmp/gpu-session}
PART=${1:-speed}
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
if [ "$PART" = default ]; then  # the README's default run on the GPU: SIGTERM after 45 s, then --resume auto
    # to the end; the GPU's peak memory in use (the whole device, CUDA context included) sampled every 0.5 s.
    # DEVICE and DEFAULT_FLAGS let the same steps run on a CPU (tried with DEVICE=cpu DEFAULT_FLAGS="--epochs 2").
    out=runs/gpu-default start=$SECONDS
    rm -rf "$out"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/memory.txt" 2>/dev/null &
    sampler=$!
    timeout -s TERM 45 python3 train.py --device "${DEVICE:-cuda}" --out "$out" $DEFAULT_FLAGS 2>&1 | say
    echo "stopped by SIGTERM after $((SECONDS - start)) s; last.pt: $(ls "$out"/last.pt 2>&1)" | say
    timeout 400 python3 train.py --device "${DEVICE:-cuda}" --out "$out" --resume auto $DEFAULT_FLAGS 2>&1 | say
    echo "default run, stopped and resumed: $((SECONDS - start)) s; exit ${PIPESTATUS[0]}" | say
    kill $sampler 2>/dev/null
    echo "peak GPU memory in use: $(sort -n "$OUT/memory.txt" 2>/dev/null | tail -1) MiB" | say
    cp "$out"/metrics.jsonl "$OUT/" 2>/dev/null
    exit 0
fi
if [ "$PART" = recipe ]; then  # the paper's recipe end to end: ResNet-50, 224 px, batch 128, JPEGs at
    # ImageNet's sizes written here, SCDA from a ResNet-50, the hard negative, hp, the split loader
    start=$SECONDS
    timeout 120 python3 shapes.py --jpeg-folder "$OUT/jpegs" --images 3000 100 2>&1 | say
    echo "JPEG folder: $((SECONDS - start)) s" | say
    bench recipe-paper 300 --recipe paper --channels-last --data-dir "$OUT/jpegs" --workers $(( $(nproc) - 2 )) \
        --repeats 3
    exit 0
fi
study() {   # SECONDS FLAGS...: study.py, 8 runs at a time; after SECONDS, Ctrl-C to it and its runs (timeout
    local limit=$1 start=$SECONDS; shift   # signals its process group): they save and stop
    [ "$limit" -ge 60 ] || { echo "study $*: skipped, ${limit} s left" | say; return; }
    timeout -s INT -k 60 "$limit" python3 study.py --jobs 8 --threads 2 --device cuda --out runs/gpu-study \
        --results runs/gpu-study/study.json --channels-last --workers 2 --shapes-cache runs/shapes-cache "$@" 2>&1 \
        | grep --line-buffered -v "^|" | say
    cp runs/gpu-study/study.json "$OUT/study.json"
    echo "study $*: $((SECONDS - start)) s" | say
}
if [ "$PART" = study ]; then   # the object-scale study: rows 3 5 4 1 (and the method at 144 px), 3 seeds each
    # Runs and records live in the repository's runs/ (ignored), which a warm machine keeps: a call made at once
    # after one stopped by its limit resumes its runs. OUT/study.json comes back after each scale: copy it to
    # results/study.json before the next call, so that a fresh machine skips the runs already recorded. The
    # smallest objects first (the scale still to run); the drawn images are kept in runs/shapes-cache, drawn once.
    mkdir -p runs/gpu-study
    [ -f runs/gpu-study/study.json ] || cp results/study.json runs/gpu-study/study.json
    start=$SECONDS       # the 144 px splits drawn once with every core, before 8 runs wait for the first one's draw
    OMP_NUM_THREADS=$(nproc) timeout 240 python3 -c "import data; [data.load_split('shapes', '', split,
        image_size=144, object_scale=(0.05, 0.1), shapes_cache='runs/shapes-cache') for split in ('train', 'test')]"
    echo "the 144 px images drawn: $((SECONDS - start)) s" | say
    study $((480 - SECONDS)) --rows 3 5 4 1 9 --shapes-object-scale 0.05 0.1 --image-size 144
    study $((480 - SECONDS)) --rows 3 5 4 1 --shapes-object-scale 0.08 0.15 --image-size 96
    study $((480 - SECONDS)) --rows 3 5 4 1 --shapes-object-scale 0.15 0.25 --image-size 56
    exit 0
fi
bench eager 60 --channels-last                                       # about 30 s
timeout 40 python3 bench.py --part encoder --amp bf16 2>&1 | say     # about 20 s
bench compiled 300 --channels-last --compile --no-parts               # compiles three configurations
start=$SECONDS                                                        # the compiled step against eager
timeout 120 python3 -m pytest -q -x test_all.py -k "compiled_step or cuda" -p no:cacheprovider 2>&1 | tail -5 | say
echo "GPU tests: $((SECONDS - start)) s" | say
bench cuda-graphs 100 --channels-last --compile reduce-overhead --no-parts

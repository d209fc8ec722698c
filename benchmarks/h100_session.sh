#!/usr/bin/env bash
# One prepared GPU session (one H100): the CUDA path of pretrain.py, step throughput next to
# Hugging Face ViTMAE, and the quality benchmark's gpu budget for plain MAE and the default
# APL setting (40 epochs each, probed and fine-tuned by benchmarks/quality.py).
# Results land in $OUT. Usage, from the repo root:
#   FMNIST=/path/to/fashion-mnist-idx OUT=/tmp/out bash benchmarks/h100_session.sh
set -u
OUT=${OUT:-/tmp/maepl_out}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "=== $(date +%T) $*"; }
quiet() { grep -v -E "pretrain: +[0-9]+%" || true; }

log versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"

log "smoke: pretrain.py on CUDA, bf16, --compile"
timeout 150 python pretrain.py --config configs/quickstart.yaml --max_steps 60 --compile \
    --num_workers 8 --log_every 20 --output_dir /tmp/smoke 2>&1 | quiet | tail -6
tail -1 /tmp/smoke/log.jsonl

log "throughput, ViT-B/16, eager"
timeout 200 python benchmarks/throughput.py --preset vit_base --json "$OUT/throughput_eager.json" 2>&1 | tail -22

log "quality benchmark, gpu budget (reference setup), MAE vs the default APL, one seed"
timeout 420 python benchmarks/quality.py --budget gpu --seeds 1 --variants mae,apl_drop \
    --data_path "$FMNIST" --out /tmp/quality_gpu 2>&1 | grep -E '^\{|^\|' | tail -12
cp /tmp/quality_gpu/results.json "$OUT/quality_gpu.json"  # few files come back: results only

log "throughput, ViT-B/16, torch.compile (plain, apl, rpl, hf)"
timeout 400 python benchmarks/throughput.py --preset vit_base --compile --steps 15 --warmup 5 --only plain,apl,rpl,hf \
    --json "$OUT/throughput_compile.json" 2>&1 | tail -14
log end

#!/usr/bin/env bash
# One prepared GPU session (one H100): the CUDA path of pretrain.py, step throughput next to
# Hugging Face ViTMAE, and the Fashion-MNIST reference runs (plain MAE vs the default APL
# setting, 40 epochs each, run side by side) evaluated with benchmarks/eval_encoder.py.
# Results land in $OUT. Usage, from the repo root:
#   FMNIST=/path/to/fashion-mnist-idx OUT=/tmp/out bash benchmarks/h100_session.sh
set -u
OUT=${OUT:-/tmp/maepl_out}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
EPOCHS=${EPOCHS:-40}
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

log "Fashion-MNIST reference runs, $EPOCHS epochs, side by side"
common=(--config configs/fmnist_vit_tiny.yaml --data_path "$FMNIST" --epochs "$EPOCHS"
        --num_workers 7 --compile --vis_every 100 --save_every 100)
timeout 330 python pretrain.py "${common[@]}" --pos_label none --output_dir /tmp/fm_plain > "$OUT/fm_plain.log" 2>&1 &
timeout 330 python pretrain.py "${common[@]}" --output_dir /tmp/fm_apl > "$OUT/fm_apl.log" 2>&1 &
wait
for v in plain apl; do
    quiet < "$OUT/fm_$v.log" | tail -3
    tail -1 /tmp/fm_$v/log.jsonl
    cp /tmp/fm_$v/log.jsonl "$OUT/fm_${v}_log.jsonl" 2>/dev/null
done
log "evaluation (kNN + linear probe on frozen features)"
for v in plain apl; do
    timeout 90 python benchmarks/eval_encoder.py /tmp/fm_$v/export/encoder --data_path "$FMNIST" \
        --num_workers 8 --json "$OUT/eval_$v.json" 2>&1 | tail -1
done
timeout 90 python benchmarks/eval_encoder.py /tmp/fm_plain/export/encoder --data_path "$FMNIST" \
    --random_init --num_workers 8 --json "$OUT/eval_random.json" 2>&1 | tail -1

log "throughput, ViT-B/16, torch.compile (plain, apl, rpl, hf)"
timeout 400 python benchmarks/throughput.py --preset vit_base --compile --steps 15 --warmup 5 --only plain,apl,rpl,hf \
    --json "$OUT/throughput_compile.json" 2>&1 | tail -14
log end

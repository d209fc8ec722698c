#!/usr/bin/env bash
# One prepared GPU session (one GPU: an H100 up to session 9; `status` describes an H200 in
# session 13; ~15 minutes of device time in all, start-up included).
# Sections, chosen with SECTIONS (comma-separated, in this order), each under its own timeout
# so that one failure leaves the rest standing; results land in $OUT/outputs.tar.gz (below):
#   gputests    the tests that skip themselves without CUDA, then jpeg_decoders.py on
#               photo-like and random-pixel JPEGs (~1 min)
#   calib       one gpu-budget pretraining alone: eager, compiled, compiled with CUDA graphs
#               (CALIB_MODES), 300 steps each: steps/s; then (CALIB_PROFILE=1) an eager run
#               under cProfile: where the host's time goes
#   quality     benchmarks/quality.py --budget gpu for QUALITY_S seconds, QUALITY_PAR runs at
#               once (MPS=1 starts NVIDIA MPS first so that they share the GPU instead of
#               time-slicing it), merged with earlier sessions' rows (REUSE);
#               QUALITY_MODE=reduce-overhead compiles them with CUDA graphs
#   crops       gpu_crops.py: the GPU resize per image vs all crops of a batch at once, and
#               the prefetch thread's work per batch (decode alone, decode + crops)
#   throughput  pos_loss.py (the position loss alone, plain vs fused), then throughput.py
#               ViT-B/16 compiled, THROUGHPUT_ONLY's configurations, each profiled (3 steps)
#   pipeline    data_pipeline.py: cpu vs gpu (prefetched) vs gpu:inline, with a simulated step
#   e2e         pretrain.py end to end, + APL, compiled, --data_pipeline gpu, from an ImageFolder
#               of E2E_IMAGES synthetic JPEGs (data_pipeline.py's), E2E_STEPS steps (data_ms and
#               prefetch_ms per log line; a profile of 4 steps after E2E_PROFILE_START steps,
#               default 3/4 of E2E_STEPS), for each of
#               E2E_MODELS (ViT-S/16: what the pipeline feeds; ViT-B/16: the real speed): img/s
#               per log window, to hold against throughput.py's synthetic-input figure
#   sdpa        throughput.py plain, compiled, with each attention kernel forced (SDPA_KERNELS;
#               auto picked cuDNN on the H100 with torch 2.11), compile caches off (a cached graph
#               keeps the kernel it was traced with), 3 steps profiled: the kernels that ran
#   graphs      throughput.py again with CUDA graphs (--compile_mode reduce-overhead), GRAPHS_ONLY
#   cppwrap     throughput.py ViT-B/16 plain, compiled with Inductor's C++ wrapper (kernels launched
#               from C++, not generated Python: the compiled step is host-bound), CPPWRAP_ONLY
#   ckpt        checkpoint_stall.py --snapshot_only, ViT-B/16 with AdamW state: the host copy
#               before an asynchronous save, pageable (up to session 9) vs pinned (~15 s)
# Sections run in the order SECTIONS lists them. BUDGET_S (seconds, whole script) caps every
# section's timeout by the time left, and a section with under 40 s left is skipped, so the
# script ends inside the device call's limit and the sections listed first are the sure ones.
# THROUGHPUT_ONLY picks throughput.py's configurations (most important first: each prints its
# line when it is done, so a timeout keeps the ones before it).
# Usage, from the repo root (the Fashion-MNIST idx files carried in .data/fmnist):
#   SECTIONS=calib,quality FMNIST=.data/fmnist OUT=/tmp/out bash benchmarks/h100_session.sh
set -u
OUT=${OUT:-/tmp/maepl_out}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
SECTIONS=${SECTIONS:-gputests,calib,quality}
QUALITY_S=${QUALITY_S:-400}
QUALITY_PAR=${QUALITY_PAR:-1}
MPS=${MPS:-0}
VARIANTS=${VARIANTS:-mae,apl_drop,apl_no_pe,apl_pe_kept,apl_drop_smooth,rpl_drop}
# rows of earlier GPU sessions only: benchmarks/results/quality_gpu.json holds the CPU-measured
# rows of the same budget, which pair with no GPU row (quality.py pairs by seed and device)
REUSE=${REUSE:-benchmarks/results/quality_gpu_on_gpu.json}
BUDGET_S=${BUDGET_S:-100000}
THROUGHPUT_ONLY=${THROUGHPUT_ONLY:-apl,official,plain,rpl,plain_bf16s,apl_bf16s,plain_bf16w,hf}
GRAPHS_ONLY=${GRAPHS_ONLY:-plain,plain_bf16s,apl_bf16s}
# A device call brings back at most 8 files from $OUT, and the quality section alone writes
# dozens: the sections write into a work folder, packed after each section (and on exit) into
# one archive, $OUT/outputs.tar.gz, replaced atomically, so a call killed mid-section still
# returns every section finished before; `tar xzf` it before reading or committing. $OUT
# itself holds only that archive and session.log (the caller's tee).
RESULTS=$OUT
OUT=$(mktemp -d "${TMPDIR:-/tmp}/maepl_work.XXXXXX")
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "=== $(date +%T) $*"; }
# cap WANT seconds by what BUDGET_S leaves (minus a margin for copying results); never below
# 1 s: `timeout 0` would mean no limit at all, and a negative one is an error
cap() {
  local left=$((BUDGET_S - SECONDS - 30))
  left=$(($1 < left ? $1 : left))
  echo $((left < 1 ? 1 : left))
}
pack() {
  tar czf "$RESULTS/outputs.tar.gz.part" -C "$OUT" . &&
    mv -f "$RESULTS/outputs.tar.gz.part" "$RESULTS/outputs.tar.gz"
}
MPS_STARTED=0
cleanup() {
  pack && log "packed $(find "$OUT" -type f | wc -l) files into \$OUT/outputs.tar.gz" &&
    rm -rf "$OUT"  # the work folder: all of it is in the archive
  if [ "$MPS_STARTED" = 1 ]; then echo quit | timeout 20 nvidia-cuda-mps-control; fi
}
trap cleanup EXIT
trap 'exit 143' TERM
log versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, torchvision, timm, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
# the machine's cores (GNU nproc would report OMP_NUM_THREADS instead, if it is set)
CORES=$(OMP_NUM_THREADS= nproc)
echo "cores $CORES; MPS control: $(command -v nvidia-cuda-mps-control || echo absent)"

sec_gputests() {
  log "the CUDA-only tests (skipped on CPU machines)"
  # every failure's short traceback to a file; its one-line summary to the output
  timeout -k 20 "$(cap 200)" python -m pytest -q -rfEs --tb=short tests/test_gpu_aug.py \
      tests/test_pos_labels.py tests/test_prefetch.py tests/test_pretrain.py \
      tests/test_reliability.py -k cuda \
      > "$OUT/gputests.txt" 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)| in [0-9.]+s" "$OUT/gputests.txt" | cut -c1-300
  log "nvJPEG vs the CPU decoder (and libjpeg-turbo's repeating upsampler, if djpeg is there)"
  timeout -k 20 "$(cap 60)" python benchmarks/jpeg_decoders.py 2>&1 | tail -6
  log "the same on random-pixel JPEGs (the chroma upsampler's worst case; session 5's test images)"
  timeout -k 20 "$(cap 60)" python benchmarks/jpeg_decoders.py --pattern noise 2>&1 | tail -6
}

sec_calib() {
  for mode in ${CALIB_MODES:-eager compile cudagraphs}; do
    log "calib: one gpu-budget run alone, $mode, ${CALIB_STEPS:-300} steps"
    flag=()
    [ "$mode" = compile ] && flag=(--compile)
    [ "$mode" = cudagraphs ] && flag=(--compile --compile_mode reduce-overhead)
    timeout -k 20 "$(cap "${CALIB_S:-150}")" python pretrain.py --config configs/fmnist_vit_tiny.yaml --data_path "$FMNIST" \
        --data_pipeline gpu --num_workers 2 --max_steps "${CALIB_STEPS:-300}" --log_every 100 --vis_every 1000 \
        --pos_label abs --pos_drop_ratio 0.75 "${flag[@]}" --output_dir "/tmp/calib_$mode" \
        --overwrite true > "$OUT/calib_$mode.txt" 2>&1
    python -c "import json,sys; [print(' step', r['step'], 'img/s %.0f' % r['img_per_s'], 'steps/s %.1f' % (r['img_per_s'] / 512)) for r in map(json.loads, open(sys.argv[1])) if 'img_per_s' in r]" "/tmp/calib_$mode/log.jsonl"
  done
  if [ "${CALIB_PROFILE:-1}" = 1 ]; then  # where the host's time goes (a slow run's diagnosis)
    log "calib: eager, ${PROF_STEPS:-150} steps under cProfile (main thread), top 25 by own time"
    timeout -k 20 "$(cap 120)" python -m cProfile -o "$OUT/calib_eager.prof" pretrain.py \
        --config configs/fmnist_vit_tiny.yaml --data_path "$FMNIST" --data_pipeline gpu \
        --num_workers 2 --max_steps "${PROF_STEPS:-150}" --log_every 50 --vis_every 1000 --pos_label abs \
        --output_dir /tmp/calib_prof --overwrite true > /dev/null 2>&1
    python -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(25)" \
        "$OUT/calib_eager.prof" 2>&1 | grep -E "^ +[0-9]" | cut -c1-160 | tee "$OUT/calib_eager_prof.txt"
  fi
}

sec_quality() {
  if [ "$MPS" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p /tmp/mps_pipe /tmp/mps_log
    nvidia-cuda-mps-control -d && echo "MPS started" && MPS_STARTED=1
  fi
  log "quality, gpu budget: $QUALITY_PAR at once for $QUALITY_S s (MPS=$MPS)"
  reuse=(); [ -f "$REUSE" ] && reuse=(--reuse "$REUSE")
  mode=(); [ -n "${QUALITY_MODE:-}" ] && mode=(--compile_mode "$QUALITY_MODE")
  timeout -k 20 "$(cap $((QUALITY_S + 40)))" python benchmarks/quality.py --budget gpu --seeds 2 --sweeps \
      --variants "$VARIANTS" --parallel "$QUALITY_PAR" --workers 2 --time_limit "$QUALITY_S" \
      "${reuse[@]}" "${mode[@]}" --data_path "$FMNIST" --out /tmp/quality_gpu 2>&1 \
      | grep -E '^\{|^\||^not run|^job|^reusing' | cut -c1-600 | tail -40
  mkdir -p "$OUT/quality"
  cp /tmp/quality_gpu/results.json /tmp/quality_gpu/results.md "$OUT/quality/" 2>/dev/null
  cp /tmp/quality_gpu/*.png "$OUT/quality/" 2>/dev/null
  cp -r /tmp/quality_gpu/rows "$OUT/quality/" 2>/dev/null  # finished runs, also if the rest died
  for f in /tmp/quality_gpu/logs/*.log; do
    [ -f "$f" ] && tail -c 1500 "$f" | tr '\r' '\n' | tail -8 > "$OUT/quality/$(basename "$f")"
  done
}

sec_crops() {
  log "the GPU resize: per image vs batched; decode and augment per batch (batch 256)"
  timeout -k 20 "$(cap 90)" python benchmarks/gpu_crops.py --json "$OUT/gpu_crops.json" 2>&1 | tail -5
  timeout -k 20 "$(cap 60)" python benchmarks/gpu_crops.py --tf32 --jpegs 0 2>&1 | tail -4  # float64
}

sec_throughput() {
  log "position loss alone (ViT-B/16 shapes): plain vs fused chunked cross-entropy, eager"
  timeout -k 20 "$(cap 90)" python benchmarks/pos_loss.py --json "$OUT/pos_loss.json" 2>&1 | tail -6
  log "throughput: ViT-B/16, compiled ($THROUGHPUT_ONLY), each profiled (3 steps)"
  timeout -k 20 "$(cap "${THROUGHPUT_S:-400}")" python benchmarks/throughput.py --preset vit_base --compile --steps 15 --warmup 5 \
      --only "$THROUGHPUT_ONLY" --profile 3 --json "$OUT/throughput_compile.json" \
      > "$OUT/throughput_compile.txt" 2>&1
  grep -E "^ *(plain|apl|rpl|hf|official)[a-z0-9_]* |apl_vs_official|ratio_vs_hf|benchmark time" "$OUT/throughput_compile.txt"
}

sec_pipeline() {
  log "input pipeline: cpu vs gpu (prefetched) vs gpu:inline, simulated 43 ms step"
  data=(); [ -d /tmp/jpegs/train ] && data=(--data_path /tmp/jpegs)  # e2e's, if it ran first
  timeout -k 20 "$(cap 120)" python benchmarks/data_pipeline.py --step_ms 43 "${data[@]}" --json "$OUT/data_pipeline.json" \
      2>&1 | tail -14
}
sec_e2e() {
  if [ ! -d /tmp/jpegs/train ]; then
    timeout -k 10 "$(cap 120)" python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from data_pipeline import write_synthetic
n = int(sys.argv[1]); print('wrote', n, 'JPEGs,', write_synthetic(Path('/tmp/jpegs'), n, int(sys.argv[2])) // n // 1024, 'KiB mean')" \
        "${E2E_IMAGES:-16000}" "$CORES"
  fi
  # a small model first: its step is far faster than 6,000 img/s, so it shows what the input
  # pipeline delivers; then ViT-B/16, the real training speed
  local steps=${E2E_STEPS:-200}
  local pstart=${E2E_PROFILE_START:-$((steps * 3 / 4 < steps - 4 ? steps * 3 / 4 : steps - 4))}
  for model in ${E2E_MODELS:-vit_small_patch16_224 mae_vit_base_patch16}; do
    log "end to end: pretrain.py $model + APL 0.75, compiled, --data_pipeline gpu, batch 256"
    timeout -k 20 "$(cap 200)" python pretrain.py --model "$model" --data_path /tmp/jpegs \
        --data_pipeline gpu --num_workers "$((CORES - 2))" --batch_size 256 --compile \
        --max_steps "$steps" --log_every 10 --vis_every 100000 --pos_label abs \
        --pos_drop_ratio 0.75 --output_dir "/tmp/e2e_$model" --overwrite true \
        --profile_steps 4 --profile_start "$pstart" > "$OUT/e2e_$model.txt" 2>&1
    echo "pretrain.py exit $?"
    python -c "import json,sys; [print(' step', r['step'], 'img/s %.0f' % r['img_per_s'], 'data_ms %.1f' % r['data_ms'], 'prefetch_ms %.1f' % r.get('prefetch_ms', -1)) for r in map(json.loads, open(sys.argv[1])) if 'img_per_s' in r]" "/tmp/e2e_$model/log.jsonl"
    # the profile's device table travels in e2e_<model>.txt; the trace stays on the machine
    cat "/tmp/e2e_$model/profile/table_rank0.txt" >> "$OUT/e2e_$model.txt" 2>/dev/null
  done
}

sec_sdpa() {
  for k in ${SDPA_KERNELS:-flash efficient}; do
    log "throughput: ViT-B/16 plain, compiled, attention kernel $k"
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 timeout -k 20 "$(cap 150)" python benchmarks/throughput.py \
        --preset vit_base --compile --steps 15 --warmup 5 --only plain --sdpa "$k" --profile 3 \
        > "/tmp/sdpa_$k.txt" 2>&1
    grep -E "^ *plain |Error" "/tmp/sdpa_$k.txt" | tail -2
    # which attention kernels ran (cuDNN: cudnn..sdpa; flash: flash_fwd/bwd; efficient: fmha)
    grep -i -E "sdpa|flash|fmha|attention" "/tmp/sdpa_$k.txt" | grep -v -E "^ *plain |^batch " \
        | sed 's/^ *//' | cut -c1-70 | sort -u | head -8
  done
}

sec_graphs() {
  log "throughput: ViT-B/16 with CUDA graphs (reduce-overhead): $GRAPHS_ONLY"
  timeout -k 20 "$(cap 300)" python benchmarks/throughput.py --preset vit_base --compile \
      --compile_mode reduce-overhead --steps 15 --warmup 5 --only "$GRAPHS_ONLY" \
      > "$OUT/throughput_graphs.txt" 2>&1
  grep -E "^ *(plain|apl|rpl|hf)[a-z0-9_]* |benchmark time" "$OUT/throughput_graphs.txt"
}

sec_cppwrap() {
  log "throughput: ViT-B/16 compiled with the C++ wrapper: ${CPPWRAP_ONLY:-plain}"
  timeout -k 20 "$(cap 200)" python benchmarks/throughput.py --preset vit_base --compile \
      --cpp_wrapper --steps 15 --warmup 5 --only "${CPPWRAP_ONLY:-plain}" \
      > /tmp/throughput_cppwrap.txt 2>&1
  echo "throughput.py exit $?"
  grep -E "^ *(plain|apl|rpl)[a-z0-9_]* |Error|error" /tmp/throughput_cppwrap.txt | tail -4
}

sec_ckpt() {
  log "checkpoint snapshot (host copy before an async save), ViT-B/16 + AdamW (1.25 GiB)"
  timeout -k 20 "$(cap 60)" python benchmarks/checkpoint_stall.py --saves 3 --snapshot_only \
      > /tmp/checkpoint_stall.txt 2>&1
  echo "checkpoint_stall.py exit $?"
  tail -4 /tmp/checkpoint_stall.txt  # into session.log: no file of its own
}

sec_selftest() {  # for tests/test_benchmarks.py on any machine: one file, then a pause
  SELFTEST_N=$((${SELFTEST_N:-0} + 1))
  echo "selftest $SELFTEST_N at ${SECONDS}s" > "$OUT/selftest_$SELFTEST_N.txt"
  timeout "$(cap 60)" sleep "${SELFTEST_SLEEP:-0}"  # under a cap, as every section
}

for section in ${SECTIONS//,/ }; do
  if ! declare -F "sec_$section" > /dev/null; then
    echo "unknown section '$section' (gputests, calib, quality, crops, throughput, pipeline, e2e, sdpa, graphs, cppwrap, ckpt, selftest)"
  elif [ $((BUDGET_S - SECONDS)) -lt 40 ]; then
    log "skipped $section: $((BUDGET_S - SECONDS)) s of BUDGET_S left"
  else
    "sec_$section"
    pack
  fi
done
log end

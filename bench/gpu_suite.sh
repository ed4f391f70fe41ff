#!/usr/bin/env bash
# The benchmarks' GPU rows in one call on the GPU machine (at most ~6 minutes on one H100/H200):
#   here first:   bash bench/prepare_device.sh          (fills the git-ignored .device/)
#   device call:  bash bench/gpu_suite.sh               (repo root, carry [".device"])
#   afterwards:   copy $OUT/*.json to bench/results/gpu/, then python bench/report.py
# Every part has its own time limit and may fail without stopping the others; each benchmark
# rewrites its JSON after every row, so a part cut short keeps the rows it finished.
# That machine has no faiss (exact search runs in torch; the Predictor and index rows are CPU
# only) and onnxruntime there is the CPU build (the ONNX rows use its 16 CPU cores).
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
OUT=${OUT:-/tmp/dexml_bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
PY=${PYTHON:-python3}
ENC=.device/minilm
DATA=.device/LF-DebianTags
WORK=/tmp/dexml_bench
DEADLINE=${DEADLINE:-345}  # seconds for the whole suite; a part never runs past it
DEV=${DEVICE:-cuda}
# SMOKE=1: the same commands at toy sizes on the CPU, to check the script here before a GPU call.
LOSS_X=() TP_X=() MEM_X=() SERVE_X=() LABELS=${LABELS:-1e4,1e5,1e6} SCALE=1
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu LABELS=1e3,3e3 DEADLINE=100000 SCALE=20
  LOSS_X=(--epochs 1 --max-steps 2 --batch-size 16 --test-max 200 -S train.val_max_points=64)
  TP_X=(--steps 1 --warmup 1 --batch-size 8 --label-chunk 64) MEM_X=(--batch-size 8 --steps 1)
  SERVE_X=(--repeats 2 --test-max 200)
fi
mkdir -p "$WORK"
if [ "${SMOKE:-0}" = 1 ]; then  # a tiny random BERT instead of MiniLM: checks the plumbing, fast
  ENC=$WORK/tiny
  $PY -c "from dexml.model import make_tiny_encoder; make_tiny_encoder('$ENC')"
fi

# PARTS: which parts to run, in this order: losses decoupled throughput memory serving sweep-qlen128
# sweep-lr1e-4 synthetic (default: all but decoupled). For the rows bench/gpu_session.sh did not
# produce: PARTS="decoupled serving memory sweep-qlen128 sweep-lr1e-4 synthetic".
PARTS=${PARTS:-losses throughput memory serving sweep-qlen128 sweep-lr1e-4 synthetic}

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, never beyond DEADLINE
  local name=$1 limit=$(($2 * SCALE)) left
  shift 2
  case " $PARTS " in *" $name "*) ;; *) echo "=== $name: not in PARTS"; return 0 ;; esac
  left=$((DEADLINE - SECONDS))
  if ((left < 15)); then echo "=== SKIP $name: suite deadline reached"; return 0; fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s, at ${SECONDS} s)"
  timeout -k 5 "$limit" "$@"
  echo "=== $name: exit $? at ${SECONDS} s"
}

[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers, sentence_transformers, onnxruntime; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', transformers.__version__, sentence_transformers.__version__, onnxruntime.__version__)" || true
ls -la .device "$ENC" "$DATA" || true

# TF-IDF baseline: CPU only, in the background while the GPU works (same split as the CPU row).
TFIDF=
if [[ " $PARTS " == *" losses "* ]]; then
  timeout -k 5 300 $PY bench/losses.py --data "$DATA" --device cpu --losses none --baselines tfidf \
    --out "$OUT/losses_tfidf.json" "${LOSS_X[@]}" > "$WORK/tfidf.log" 2>&1 &
  TFIDF=$!
fi

# 1. Losses on LF-DebianTags: all-label negatives, bf16 autocast, batch 256, 3 epochs (225 steps).
BUDGET=(--epochs 3 --batch-size 256 --lr 2e-4 --max-len 32 --negatives all --label-chunk 1024 --sample-positives 0)
part losses 200 $PY bench/losses.py --data "$DATA" --encoder "$ENC" --device "$DEV" --baselines zeroshot \
  "${BUDGET[@]}" --save-model "$WORK/decoupled" --workdir "$WORK/losses" --out "$OUT/losses.json" "${LOSS_X[@]}"
# Only when `losses` is not in PARTS but `serving` is: a decoupled_softmax model for the serving rows.
part decoupled 60 $PY bench/losses.py --data "$DATA" --encoder "$ENC" --device "$DEV" --baselines none \
  --losses decoupled_softmax --tag " (rerun for serving)" "${BUDGET[@]}" --save-model "$WORK/decoupled" \
  --workdir "$WORK/losses" --out "$OUT/losses_sweep.json" --append "${LOSS_X[@]}"
# 2. Training throughput per negatives mode vs sentence-transformers CachedMNRL.
part throughput 50 $PY bench/throughput.py --data "$DATA" --encoder "$ENC" --device "$DEV" --inline \
  --batch-size 256 --label-chunk 256 --max-len 32 --steps 15 --warmup 3 --out "$OUT/throughput.json" "${TP_X[@]}"
# 3. Memory vs label count (MiniLM, label length 8, fixed batch 64).
part memory 60 $PY bench/memory.py --encoder "$ENC" --device "$DEV" --inline --labels "$LABELS" \
  --batch-size 64 --query-len 32 --label-len 8 --label-chunk 4096 --steps 2 --out "$OUT/memory.json" "${MEM_X[@]}"
# 4. Serving: PyTorch on the GPU (fp32, bf16), ONNX Runtime on the CPU; int8 change of the model above.
MODEL_ARG=()
[ -f "$WORK/decoupled/dexml_encoder.json" ] && MODEL_ARG=(--model "$WORK/decoupled")
part serving 75 $PY bench/serving.py --data "$DATA" --encoder "$ENC" --device "$DEV" "${MODEL_ARG[@]}" \
  --parts encoder,int8 --repeats 30 --out "$OUT/serving.json" "${SERVE_X[@]}"
# Extras while time is left (rows in losses_sweep.json): longer queries (TF-IDF sees whole
# descriptions, median 85 tokens; the encoder sees 32, 98% of queries are cut), then
# decoupled_softmax at half the learning rate; then the synthetic default.
part sweep-qlen128 80 $PY bench/losses.py --data "$DATA" --encoder "$ENC" --device "$DEV" --baselines none \
  --losses decoupled_softmax,softmax --tag " (query len 128)" "${BUDGET[@]}" -S model.query_max_len=128 \
  --workdir "$WORK/losses" --out "$OUT/losses_sweep.json" --append "${LOSS_X[@]}"
part sweep-lr1e-4 40 $PY bench/losses.py --data "$DATA" --encoder "$ENC" --device "$DEV" --baselines none \
  --losses decoupled_softmax --tag " (lr 1e-4)" "${BUDGET[@]}" --lr 1e-4 \
  --workdir "$WORK/losses" --out "$OUT/losses_sweep.json" --append "${LOSS_X[@]}"
part synthetic 40 $PY bench/losses.py --data synthetic --encoder "$ENC" --device "$DEV" \
  "${BUDGET[@]}" --batch-size 64 --workdir "$WORK/synthetic" --out "$OUT/losses_synthetic.json" "${LOSS_X[@]}"

if [ -n "$TFIDF" ]; then
  wait $TFIDF
  echo "=== tfidf: exit $? at ${SECONDS} s"
  tail -n 5 "$WORK/tfidf.log"
fi
ls -la "$OUT"
sleep 1  # let tee flush the log

#!/usr/bin/env bash
# The GPU call of the benchmarks, trimmed to the device time a session has (~6 min of commands):
#   here first:   bash bench/prepare_device.sh          (fills the git-ignored .device/)
#   device call:  bash bench/gpu_session.sh             (repo root, carry [".device"])
# Parts in order of importance, each with its own time limit; every script rewrites its JSON
# after each row, so a part cut short keeps what it finished. bench/gpu_suite.sh is the longer
# version (serving rows, sweeps) for a session with more device time.
# Smoke check on CPU: DEV=cpu ENC=<tiny encoder dir> EPOCHS=1 MAXSTEPS=2 LABELS=1e3 bash bench/gpu_session.sh
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
OUT=${OUT:-/tmp/dexml_gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
PY=${PYTHON:-python3}
ENC=${ENC:-.device/minilm}
DATA=${DATA:-.device/LF-DebianTags}
DEV=${DEV:-cuda}
EPOCHS=${EPOCHS:-3}
LABELS=${LABELS:-1e4,1e5,1e6}
SMALL=()
[ -n "${MAXSTEPS:-}" ] && SMALL=(--max-steps "$MAXSTEPS" --test-max 300)
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"

# 1. The four losses on LF-DebianTags (all-label negatives, every positive in the loss) + zero-shot.
timeout -k 5 "${T_LOSSES:-175}" $PY bench/losses.py --data "$DATA" --encoder "$ENC" --device "$DEV" \
  --baselines zeroshot --epochs "$EPOCHS" --batch-size 256 --lr 2e-4 --max-len 32 --negatives all \
  --label-chunk 1024 --sample-positives 0 --workdir /tmp/dexml_w/losses --out "$OUT/losses.json" "${SMALL[@]}"
echo "=== losses exit $? at $SECONDS s"
# 2. Head and tail: the DE, the DE with a learned label bias, each with and without RAE.
timeout -k 5 "${T_HEADTAIL:-110}" $PY bench/head_tail.py --data "$DATA" --encoder "$ENC" --device "$DEV" \
  --variants de,bias --epochs "$EPOCHS" --no-tfidf --workdir /tmp/dexml_w/ht --out "$OUT/head_tail.json" "${SMALL[@]}"
echo "=== head_tail exit $? at $SECONDS s"
# 3. Peak memory and step time versus label count (all-label negatives, fixed batch 64).
timeout -k 5 "${T_MEMORY:-70}" $PY bench/memory.py --encoder "$ENC" --device "$DEV" --labels "$LABELS" \
  --batch-size 64 --query-len 32 --label-len 8 --label-chunk 8192 --steps 1 --timeout 60 --out "$OUT/memory.json"
echo "=== memory exit $? at $SECONDS s"
# 4. Training throughput per negatives mode next to sentence-transformers' CachedMNRL.
timeout -k 5 "${T_THROUGHPUT:-45}" $PY bench/throughput.py --data "$DATA" --encoder "$ENC" --device "$DEV" \
  --inline --batch-size 256 --label-chunk 256 --max-len 32 --steps 8 --warmup 2 --out "$OUT/throughput.json"
echo "=== throughput exit $? at $SECONDS s"
ls -la "$OUT"
sleep 1  # let tee flush the log

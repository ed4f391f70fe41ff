#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before the GPU call: fills .device/ (git-ignored via
# .git/info/exclude) with what bench/gpu_suite.sh needs and the GPU machine lacks:
#   .device/minilm/         all-MiniLM-L6-v2 as fp16 safetensors (~45 MB; config says float32,
#                           so transformers loads it into an fp32 model), tokenizer, and the
#                           sentence-transformers files (modules.json, 1_Pooling/, ...)
#   .device/LF-DebianTags/  a copy of the dataset (~4 MB)
# Usage: bash bench/prepare_device.sh [DATASET_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/LF-DebianTags}
PY=${PYTHON:-.venv/bin/python}

mkdir -p .git/info
grep -qxF '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device/minilm .device/LF-DebianTags
mkdir -p .device/LF-DebianTags
cp "$DATA"/*.json.gz "$DATA"/filter_labels_*.txt .device/LF-DebianTags/
chmod -R u+w .device/LF-DebianTags

HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from dexml.model import PACKAGED_MINILM, resolve_encoder

src, out = Path(resolve_encoder(PACKAGED_MINILM)), Path(".device/minilm")
model = AutoModel.from_pretrained(src).eval()
model.half().save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
    if (src / name).exists():
        shutil.copy(src / name, out / name)
shutil.copytree(src / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
# save_pretrained records dtype float16, which transformers 5 would load as an fp16 model
# (no good for training); float32 makes it upcast the fp16 tensors into an fp32 model.
cfg = json.loads((out / "config.json").read_text())
cfg["dtype"] = "float32"
cfg.pop("torch_dtype", None)
(out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

# Check: loads as fp32 and embeds like the original (cosine of the sentence embeddings).
from dexml.config import ModelParams
from dexml.model import DualEncoder

texts = ["vim: Vi IMproved - enhanced vi editor", "python3-numpy: fast array facility", "libc6: GNU C Library"]
ref = DualEncoder.from_params(ModelParams(encoder=PACKAGED_MINILM)).embed(texts)
new_model = DualEncoder.from_params(ModelParams(encoder=str(out)))
dtypes = {p.dtype for p in new_model.parameters()}
cos = (ref * new_model.embed(texts)).sum(1)
print(f".device/minilm: parameter dtypes {dtypes}, cosine to the fp32 original min {cos.min():.6f}")
assert dtypes == {torch.float32} and cos.min() > 0.999, "fp16 copy does not load as an fp32 MiniLM"
try:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert {p.dtype for p in st.parameters()} == {torch.float32}
    print(".device/minilm: sentence-transformers loads it as fp32")
except ImportError:
    pass
EOF
du -sh .device/minilm .device/LF-DebianTags

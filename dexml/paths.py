"""The files between stages (the contracts in dvc.yaml), relative to the repository root."""
DATA_METRICS = "metrics/data.json"  # validate: dataset statistics (DVC metrics)
VALIDATION_REPORT = "reports/validation.json"  # validate: the full great-expectations report
TOKEN_CACHE_DIR = "cache/tokens"  # train: memory-mapped token ids, keyed by text+tokenizer hash
MODEL_DIR = "models/encoder"  # train: HF + sentence-transformers format + dexml_encoder.json
CHECKPOINT_DIR = "checkpoints/train"  # train: resumable state (not a DVC output)
TRAIN_METRICS = "metrics/train.json"
HELDOUT_ROWS = "models/heldout_rows.json"  # train: the training rows held out for validation
TRAIN_PLOTS = "plots/train"  # loss.csv (per step), val.csv (per epoch)
BUNDLE_DIR = "artifacts/bundle"
BUNDLE_ENCODER = "artifacts/bundle/encoder"  # export: ONNX encoder(s), tokenizer, export report
BUNDLE_INDEX = "artifacts/bundle/index"  # index: faiss index(es), labels
BUNDLE_MANIFEST = "artifacts/bundle/manifest.json"  # evaluate: metrics, params, checksums
PRODUCTION_DIR = "artifacts/production"  # flows: promoted bundle (and previous, for rollback)
EVAL_METRICS = "metrics/eval.json"
PREDICTIONS = "predictions/tst_scores.npz"
EVAL_PLOTS = "plots/eval"  # precision_recall_at_k.csv, buckets.csv

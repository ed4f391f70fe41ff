"""Serving without torch: the ONNX encoder, faiss indexes, the bundle and its manifest, the
Predictor, retrieval augmentation and label priors folded into the index.

Everything under this package imports neither torch nor transformers (tested).
"""

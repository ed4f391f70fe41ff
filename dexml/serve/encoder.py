"""The shipped text encoder, torch-free: ONNX graph(s) run by onnxruntime + a `tokenizers` tokenizer.

The `export` stage writes an encoder directory; this module is the only reader of it:
    encoder.json     pooling, normalize, dim, tau, max lengths, pad token, which file per side
    tokenizer.json   the Hugging Face fast tokenizer (its saved padding/truncation are ignored)
    model.onnx | query.onnx + label.onnx, optional *_int8.onnx
    label_bias.safetensors  optional: per-label score offsets (dexml.priors; `label_bias` in
                     encoder.json names it), folded into the label index by the index stage
encoder.json's optional `session` holds the onnxruntime settings the export chose from params
(intra-op threads, graph optimisation level); `variant` names the graph the export measured fastest.
Each graph takes int64 `input_ids` and `attention_mask` (batch, seq) and returns
`sentence_embedding` (batch, dim), pooling and L2 normalisation included.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dexml.errors import BundleError, require_optional
from dexml.fileio import read_json
from dexml.progress import bar

ort = require_optional("onnxruntime")

ENCODER_META = "encoder.json"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
SIDES = ("query", "label")
# export.ort_graph_optimization -> onnxruntime's level (the export writes the name into encoder.json)
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
DEFAULT_SESSION = {"intra_op_num_threads": 0, "graph_optimization_level": "all"}
_META_KEYS = ("pooling", "normalize", "dim", "tau", "query_max_len", "label_max_len", "pad_token",
              "pad_id", "padding_side", "truncation_side", "files", "int8_files")


def ort_providers(allow_gpu: bool = True) -> list[str]:
    """CUDA when onnxruntime-gpu is installed (it falls back to CPU without a usable GPU), else CPU."""
    if allow_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(session: dict | None = None, intra_op_threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime options from encoder.json's `session` settings (None: the defaults);
    intra_op_threads overrides the recorded thread count (0 = onnxruntime's default, all cores)."""
    settings = {**DEFAULT_SESSION, **(session or {})}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about CPU fallback nodes are noise here
    threads = settings["intra_op_num_threads"] if intra_op_threads is None else intra_op_threads
    options.intra_op_num_threads = int(threads)
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[settings["graph_optimization_level"]]
    return options


def read_encoder_meta(encoder_dir: str | Path) -> dict:
    path = Path(encoder_dir) / ENCODER_META
    meta = read_json(path, BundleError, "run the export stage")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta["files"], dict) or not all(s in meta["files"] for s in SIDES):
        raise BundleError(f"{path}: expected keys {', '.join(_META_KEYS)} with files for "
                          f"{' and '.join(SIDES)}; missing {', '.join(missing) or 'a side in `files`'}")

    def is_int(v, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key, ok, expected in (
            ("dim", is_int(meta["dim"], 1), "a positive integer"),
            ("query_max_len", is_int(meta["query_max_len"], 2), "an integer >= 2"),
            ("label_max_len", is_int(meta["label_max_len"], 2), "an integer >= 2"),
            ("pad_id", is_int(meta["pad_id"], 0), "an integer >= 0"),
            ("pad_token", isinstance(meta["pad_token"], str), "a string"),
            ("padding_side", meta["padding_side"] in ("left", "right"), "left or right"),
            ("truncation_side", meta["truncation_side"] in ("left", "right"), "left or right"),
            ("files", all(isinstance(v, str) for v in meta["files"].values()), "file names"),
            ("int8_files", isinstance(meta["int8_files"], dict)
             and all(isinstance(v, str) for v in meta["int8_files"].values()), "a mapping of file names")):
        if not ok:
            raise BundleError(f"{path}: `{key}` expected {expected}, got {meta[key]!r}")
    session = meta.get("session")
    if session is not None and not (
            isinstance(session, dict) and set(session) <= set(DEFAULT_SESSION)
            and is_int(session.get("intra_op_num_threads", 0), 0)
            and session.get("graph_optimization_level", "all") in GRAPH_OPTIMIZATION):
        raise BundleError(f"{path}: `session` expected {{\"intra_op_num_threads\": an integer >= 0, "
                          f"\"graph_optimization_level\": one of {', '.join(GRAPH_OPTIMIZATION)}}}, got {session!r}")
    return meta


class OnnxEncoder:
    """Embeds texts for one side ("query" or "label") exactly as the exported PyTorch towers do.

    int8=True uses the int8 graph for the sides that have one (the export quantizes the query
    side only: labels are embedded offline, so only query latency matters at serving time).
    intra_op_threads: onnxruntime threads, overriding encoder.json's `session` (None: as recorded).
    """

    def __init__(self, encoder_dir: str | Path, int8: bool = False, allow_gpu: bool = True,
                 intra_op_threads: int | None = None):
        from tokenizers import Tokenizer

        self.dir = Path(encoder_dir)
        self.meta = read_encoder_meta(self.dir)
        files = dict(self.meta["files"])
        if int8:
            if not self.meta["int8_files"]:
                raise BundleError(f"{self.dir / ENCODER_META}: no int8 encoder in this bundle "
                                  "(export with export.quantize_int8=true)")
            files.update(self.meta["int8_files"])
        self.files = files
        self.int8 = int8
        options = session_options(self.meta.get("session"), intra_op_threads)
        providers = ort_providers(allow_gpu)
        sessions: dict[str, ort.InferenceSession] = {}
        for name in sorted(set(files.values())):
            path = self.dir / name
            if not path.exists():
                raise BundleError(f"{path}: file not found (named in {ENCODER_META}; run the export stage)")
            try:
                sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
                raise BundleError(f"{path}: onnxruntime cannot load it ({e})") from None
        self._sessions = {side: sessions[files[side]] for side in SIDES}
        self.providers = self._sessions["query"].get_providers()
        tok_path = self.dir / TOKENIZER_FILE
        if not tok_path.exists():
            raise BundleError(f"{tok_path}: file not found (run the export stage)")
        self._tokenizers = {}
        for side in SIDES:
            try:
                tok = Tokenizer.from_file(str(tok_path))
            except Exception as e:
                raise BundleError(f"{tok_path}: cannot load the tokenizer ({e})") from None
            # Same as the training tokenizer call: pad to the longest text in the batch,
            # truncate (special tokens included) to the side's max length.
            tok.no_padding()
            tok.enable_truncation(max_length=int(self.meta[f"{side}_max_len"]),
                                  direction=self.meta["truncation_side"])
            tok.enable_padding(direction=self.meta["padding_side"], pad_id=int(self.meta["pad_id"]),
                               pad_token=self.meta["pad_token"])
            self._tokenizers[side] = tok

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def tokenize(self, texts: list[str], side: str) -> tuple[np.ndarray, np.ndarray]:
        encs = self._tokenizers[side].encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def embed(self, texts: list[str], side: str = "query", batch_size: int = 256,
              progress: str | None = None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, L2-normalised when the model normalises.
        progress: a description to show a progress bar with (None: quiet)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        session = self._sessions[side]
        out = [np.zeros((0, self.dim), np.float32)]
        with bar(len(texts), progress, unit="text") as shown:
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[i:i + batch_size], side)
                emb = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
                if emb.ndim != 2 or emb.shape[1] != self.dim:
                    raise BundleError(f"{self.dir / ENCODER_META}: `dim` is {self.dim}, but {self.files[side]} "
                                      f"returns vectors of shape {tuple(emb.shape[1:])} (re-export the encoder)")
                out.append(emb.astype(np.float32, copy=False))
                shown.update(len(ids))
        return np.concatenate(out)

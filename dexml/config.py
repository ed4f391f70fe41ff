"""params.yaml -> typed, validated settings.

Every section is a dataclass; unknown keys, wrong types and out-of-range values raise one
`ConfigError` that names the key path (e.g. `train.lr`) and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dexml.errors import ConfigError

# The most labels one query may ask for anywhere (predict, evaluate.k, rae.k): results are
# (queries x k) arrays, so k bounds the memory a request can claim (dexml/serve/predictor.py).
MAX_K = 10_000
# The ONNX opsets export.opset may name: BERT attention (scaled_dot_product_attention) needs
# 14; 20 is the newest the TorchScript exporter writes.
OPSET_RANGE = (14, 20)


@dataclass
class SyntheticParams:
    num_labels: int = 120
    num_train: int = 1000
    num_test: int = 400
    words_per_label: int = 6
    labels_per_point: float = 2.5  # mean; drawn from a shifted Poisson, at least 1
    zipf_exponent: float = 1.1  # label popularity ~ rank^-exponent (head and long tail)
    query_words: int = 10
    noise_fraction: float = 0.3  # share of query words drawn from the shared noise vocabulary
    seed: int = 0


@dataclass
class DatasetParams:
    # `synthetic`, a registered name (EURLex-4K, LF-AmazonTitles-131K, LF-AmazonTitles-1.3M,
    # LF-Wikipedia-500K), `local` (a directory or archive at `path`) or `url` (an archive).
    source: str = "synthetic"
    path: Optional[str] = None  # also: a registered dataset's already-downloaded file(s)
    url: Optional[str] = None
    sha256: Optional[str] = None
    # Propensity constants for PSP metrics; null = the registered dataset's (or 0.55 / 1.5).
    propensity_a: Optional[float] = None
    propensity_b: Optional[float] = None
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass
class DataParams:
    dir: str = "data/dataset"  # where `download` writes the canonical LF layout
    # Text fed to the encoder: the title alone, or title + ". " + content.
    query_text: Literal["title", "title+content"] = "title"
    label_text: Literal["title", "title+content"] = "title"


@dataclass
class ModelParams:
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"  # hub name or local path
    shared: bool = True  # one encoder for queries and labels; False = two towers
    pooling: Literal["mean", "cls"] = "mean"
    projection: Optional[int] = None  # output size of an optional linear projection
    normalize: bool = True
    tau: float = 0.05
    query_max_len: int = 32
    label_max_len: int = 16
    # One learned score offset per label (a popularity prior), folded into the label vectors
    # at the index stage; labels without a training positive keep 0 (dexml/serve/priors.py).
    label_bias: bool = False
    label_bias_lr_scale: float = 100.0  # the bias learns this many times faster than train.lr
    # UniDEC's classifier head (dexml/train/classifier.py): a query projection and one free vector
    # per label (an L x dim table, row-wise Adagrad), trained with the same loss over the same pool;
    # folded into the label index with the dual encoder's vectors (dexml/serve/classifier.py).
    classifier: bool = False
    # table rows at the start: the untrained encoder's label embeddings, or 0
    classifier_init: Literal["embedding", "zeros"] = "embedding"
    classifier_weight: float = 1.0  # total loss = loss(dual encoder) + this * loss(classifier)
    classifier_lr: float = 0.01  # row-wise Adagrad learning rate of the table (scaled by train's schedule)


@dataclass(frozen=True)
class LossType:
    module: str  # the implementation: a module that defines `loss` (dense) and `chunked`
    options: tuple[str, ...]  # the loss.* params it takes besides `name`
    help: str


# loss.name: one of these. Config checks, error messages, params.yaml's comment and docs/losses.md
# come from this table (tested); the implementations resolve through it (dexml/train/losses/).
# A new loss is one module there plus one row here.
LOSS_TYPES = {
    "softmax": LossType("dexml.train.losses.softmax", (),
                        "InfoNCE over every unmasked label: -log(e^s_p / sum_j e^s_j) per positive p"),
    "decoupled_softmax": LossType("dexml.train.losses.decoupled_softmax", (),
                                  "the paper's loss: like softmax, but the other positives are no competitors"),
    "soft_topk": LossType("dexml.train.losses.soft_topk", ("k", "alpha"),
                          "SoftTop-k: -log sigma(alpha (s_p + t)), t making the soft top-k indicators sum to k"),
    "bce": LossType("dexml.train.losses.bce", (),
                    "binary cross-entropy with logits, the mean over every unmasked entry"),
}


@dataclass
class LossParams:
    name: str = "decoupled_softmax"  # a name in LOSS_TYPES
    k: int = 5  # soft_topk only
    alpha: float = 2.0  # soft_topk only

    def options(self) -> dict:
        """The options the named loss takes, e.g. {"k": 5, "alpha": 2.0} for soft_topk."""
        return {key: getattr(self, key) for key in LOSS_TYPES[self.name].options}


@dataclass(frozen=True)
class NegativeMode:
    help: str
    knobs: tuple[str, ...] = ()  # the negatives.* settings the mode reads (besides label_chunk)


# negatives.mode: which labels a training step scores its queries against and which of them it
# re-encodes with gradients. The objects live in dexml/train/negatives.py (torch); this table is
# what the config accepts, its errors and the docs (docs/negatives.md) say.
NEGATIVE_MODES = {
    "all": NegativeMode("every label in every step, all of them re-encoded with gradients "
                        "(gradient caching in label_chunk chunks): the paper's setting, exact"),
    "in-batch": NegativeMode("the positives in the batch's loss only (train.sample_positives per query); one "
                             "encode with gradients when the pool fits in label_chunk"),
    "hard": NegativeMode("the batch's sampled positives + num_hard per query sampled from its top-`shortlist` "
                         "labels, the shortlist rebuilt every `refresh_every` epochs",
                         ("num_hard", "shortlist", "refresh_every")),
    "cached": NegativeMode("every label scored against a no-grad table of all label embeddings, refreshed "
                           "at each epoch start and every `refresh_steps` steps; the batch's positives + "
                           "per query the top `num_hard` negatives under the cached scores (+ `num_random` "
                           "uniform ones) re-encoded with gradients", ("num_hard", "num_random", "refresh_steps")),
}


@dataclass
class NegativesParams:
    mode: str = "all"  # a name in NEGATIVE_MODES
    label_chunk: int = 128  # labels encoded with gradients per chunk (gradient caching beyond one chunk)
    num_hard: int = 8  # hard / cached: negatives per query
    shortlist: int = 50  # hard: top labels per query the negatives are sampled from
    refresh_every: int = 1  # hard: epochs between shortlist rebuilds
    # cached: steps between label-table refreshes (also at every epoch start). Measured on
    # LF-DebianTags (docs/negatives.md): refreshing every 20 steps left the table as stale as every
    # 50 (cosine to the fresh rows 0.68 vs 0.69) and trained a worse model (P@5 37.7 vs 42.0), at
    # 2x the refresh cost; only a few steps keep it fresh (0.89-0.999 after 5 steps, synthetic).
    refresh_steps: int = 50
    num_random: int = 0  # cached: uniformly random extra negatives per query, re-encoded with gradients


@dataclass
class TrainParams:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of steps
    grad_clip: Optional[float] = 1.0
    # PSL: positives per query per step in the loss (uniform, seeded); 0 = every positive
    sample_positives: int = 1
    val_fraction: float = 0.1
    val_max_points: int = 2000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 autocast on CUDA only
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    max_steps: Optional[int] = None  # stop early (smoke runs)
    nproc: int = 1  # processes per node; > 1 launches torchrun
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass
class ExportParams:
    opset: int = 17
    parity_tol: float = 1e-4
    quantize_int8: bool = False  # also write an int8 (dynamic, per-channel) query encoder
    parity_texts: int = 64  # held-out test queries and labels compared with PyTorch (+ edge cases)
    # Which graph ships (dexml/pipeline/export.py): auto = the fastest measured that passes parity.
    variant: Literal["auto", "sdpa", "eager", "sdpa_fused", "eager_fused"] = "auto"
    variant_repeats: int = 5  # auto: timed runs per variant (one batch of 32 queries each)
    ort_threads: int = 0  # onnxruntime intra-op threads recorded in the bundle; 0 = all cores
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


@dataclass(frozen=True)
class IndexType:
    factory: str  # faiss index factory string, filled in from the index.* params
    help: str


# index.type: one of these names, or any faiss index factory string (every index faiss has, e.g.
# "HNSW32,Flat" or the re-ranked IVF-PQ "IVF4096,PQ48x4fs,RFlat"); the index is inner product.
INDEX_TYPES = {
    "auto": IndexType("", "flat up to index.auto_flat_max labels, hnsw beyond"),
    "flat": IndexType("Flat", "exact search"),
    "hnsw": IndexType("HNSW{hnsw_m},Flat", "graph search; index.hnsw_m, hnsw_ef_construction, hnsw_ef_search"),
    "ivfpq": IndexType("IVF{nlist},PQ{pq_m}x{nbits}",
                       "inverted lists + product quantization; index.ivf_nlist, ivf_nprobe, pq_m"),
}


@dataclass
class IndexParams:
    type: str = "auto"  # a name in INDEX_TYPES or a faiss index factory string
    auto_flat_max: int = 200_000  # auto: exact search up to this many labels, HNSW beyond
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 256
    ivf_nlist: int = 0  # 0 = about 4 * sqrt(num_labels)
    ivf_nprobe: int = 32
    pq_m: int = 0  # 0 = d / 4 sub-quantizers (d must divide)
    refine_k_factor: float = 4.0  # factory strings with a refinement stage (",RFlat"): candidates re-ranked per result
    use_gpu: Literal["auto", "off"] = "auto"  # faiss and ONNX Runtime on the GPU (index, evaluate) | CPU
    batch_size: int = 256  # labels per ONNX encoder call
    # With a classifier head: the index ranks by dual-encoder score + this * classifier score
    classifier_gamma: float = 1.0


@dataclass
class EvaluateParams:
    k: int = 100
    batch_size: int = 256


@dataclass
class RaeParams:
    """Retrieval-augmented prediction (dexml/serve/rae.py): label scores mixed with the labels of the
    nearest training queries, kept in a second faiss index in the bundle."""
    enabled: bool = False  # index: build the training-query memory; evaluate: tune and ship it
    k: int = 100  # labels and training queries retrieved per query
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    temperatures: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.05, 0.1, 0.2])
    metric: str = "P@5"  # what the validation grid search maximises


@dataclass
class FlowParams:
    gate_metric: str = "P@5"
    min_delta: float = 0.0
    guarded: dict = field(default_factory=lambda: {"P@1": 1.0, "PSP@5": 1.0})
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    download_retries: int = 2  # the retrain flow's download task: extra attempts after a failure
    download_retry_delay: float = 60.0  # seconds before the first retry; doubles each time


@dataclass
class ServeParams:
    """`dexml serve` (dexml/serve/server.py); flags of the same name override these."""
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 64  # texts per encoder call (micro-batching)
    max_wait_ms: float = 2.0  # how long a batch waits for more requests once it has one
    queue_size: int = 256  # requests waiting for the encoder; beyond: 503 with Retry-After
    timeout_s: float = 10.0  # per request, queueing included; beyond: 504
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text
    max_body_bytes: int = 1_000_000
    max_k: int = 100  # labels per text a request may ask for (also at most the bundle's label count)
    default_k: int = 5
    watch_interval_s: float = 2.0  # how often the bundle path is checked for a new bundle
    drain_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    threads: int = 0  # onnxruntime intra-op threads; 0 = as the bundle records (export.ort_threads)
    int8: bool = False  # serve the bundle's int8 query encoder


@dataclass
class Params:
    dataset: DatasetParams = field(default_factory=DatasetParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossParams = field(default_factory=LossParams)
    negatives: NegativesParams = field(default_factory=NegativesParams)
    train: TrainParams = field(default_factory=TrainParams)
    export: ExportParams = field(default_factory=ExportParams)
    index: IndexParams = field(default_factory=IndexParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    rae: RaeParams = field(default_factory=RaeParams)
    flow: FlowParams = field(default_factory=FlowParams)
    serve: ServeParams = field(default_factory=ServeParams)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a type annotation, naming `key` on failure."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"params key `{key}`: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"params key `{key}`: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params key `{key}`: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params key `{key}`: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params key `{key}`: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"params key `{key}`: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"params key `{key}`: expected a non-empty list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params key `{key}`: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ConfigError(
            f"unknown params key(s) {', '.join(f'`{_join(prefix, u)}`' for u in unknown)} "
            f"in {where}; expected some of: {', '.join(sorted(names))}"
        )
    kwargs = {n: _convert(v, hints[n], _join(prefix, n)) for n, v in raw.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check(p: Params) -> None:
    """Range checks that types alone cannot express."""

    def need(cond: bool, key: str, expected: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"params key `{key}`: expected {expected}, got {value!r}")

    s = p.dataset.synthetic
    for name in ("num_labels", "num_train", "num_test", "words_per_label", "query_words"):
        need(getattr(s, name) > 0, f"dataset.synthetic.{name}", "a positive integer", getattr(s, name))
    need(s.labels_per_point >= 1, "dataset.synthetic.labels_per_point", ">= 1", s.labels_per_point)
    need(0 <= s.noise_fraction < 1, "dataset.synthetic.noise_fraction", "in [0, 1)", s.noise_fraction)
    if p.dataset.source == "local":
        need(bool(p.dataset.path), "dataset.path", "a directory or archive path when source is local", p.dataset.path)
    if p.dataset.sha256 is not None:
        need(len(p.dataset.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in p.dataset.sha256),
             "dataset.sha256", "64 hexadecimal digits (or null)", p.dataset.sha256)
    if p.dataset.source == "url":
        need(bool(p.dataset.url) and p.dataset.url.startswith(("http://", "https://")),
             "dataset.url", "an http(s) URL when source is url", p.dataset.url)
    m = p.model
    need(m.tau > 0, "model.tau", "a positive number", m.tau)
    need(m.query_max_len > 1, "model.query_max_len", "an integer > 1", m.query_max_len)
    need(m.label_max_len > 1, "model.label_max_len", "an integer > 1", m.label_max_len)
    need(m.projection is None or m.projection > 0, "model.projection", "null or a positive integer", m.projection)
    need(p.loss.name in LOSS_TYPES, "loss.name", f"one of {list(LOSS_TYPES)}", p.loss.name)
    need(p.loss.k > 0, "loss.k", "a positive integer", p.loss.k)
    need(p.loss.alpha > 0, "loss.alpha", "a positive number", p.loss.alpha)
    n = p.negatives
    need(n.label_chunk > 0, "negatives.label_chunk", "a positive integer", n.label_chunk)
    need(n.num_hard > 0, "negatives.num_hard", "a positive integer", n.num_hard)
    need(n.shortlist >= n.num_hard, "negatives.shortlist", f">= negatives.num_hard ({n.num_hard})", n.shortlist)
    need(n.refresh_every > 0, "negatives.refresh_every", "a positive integer", n.refresh_every)
    need(n.mode in NEGATIVE_MODES, "negatives.mode", "one of " + ", ".join(
        f"{name} ({mode.help})" for name, mode in NEGATIVE_MODES.items()), n.mode)
    need(n.refresh_steps > 0, "negatives.refresh_steps", "a positive integer", n.refresh_steps)
    need(n.num_random >= 0, "negatives.num_random", "an integer >= 0", n.num_random)
    t = p.train
    need(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    need(t.batch_size > 0, "train.batch_size", "a positive integer", t.batch_size)
    need(t.lr > 0, "train.lr", "a positive number", t.lr)
    need(t.sample_positives >= 0, "train.sample_positives",
         "an integer >= 0 (0 = every positive, b = up to b sampled positives per query per step)", t.sample_positives)
    need(0 <= t.warmup < 1, "train.warmup", "a fraction in [0, 1)", t.warmup)
    need(0 < t.val_fraction < 1, "train.val_fraction", "a fraction in (0, 1)", t.val_fraction)
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         "train.device", "auto, cpu, cuda or cuda:N", t.device)
    need(t.nproc >= 1, "train.nproc", "a positive integer", t.nproc)
    need(p.export.parity_tol > 0, "export.parity_tol", "a positive number", p.export.parity_tol)
    need(p.export.parity_texts > 0, "export.parity_texts", "a positive integer", p.export.parity_texts)
    need(p.evaluate.k >= 5, "evaluate.k", "an integer >= 5", p.evaluate.k)
    need(p.index.batch_size > 0, "index.batch_size", "a positive integer", p.index.batch_size)
    need(p.evaluate.batch_size > 0, "evaluate.batch_size", "a positive integer", p.evaluate.batch_size)
    for key in ("auto_flat_max", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
        need(getattr(p.index, key) > 0, f"index.{key}", "a positive integer", getattr(p.index, key))
    need(m.label_bias_lr_scale > 0, "model.label_bias_lr_scale", "a positive number", m.label_bias_lr_scale)
    need(m.classifier_weight >= 0, "model.classifier_weight", "a number >= 0", m.classifier_weight)
    need(m.classifier_lr > 0, "model.classifier_lr", "a positive number", m.classifier_lr)
    r = p.rae
    need(r.k > 0, "rae.k", "a positive integer", r.k)
    need(all(0 <= v <= 1 for v in r.lambdas), "rae.lambdas", "weights in [0, 1]", r.lambdas)
    need(all(v > 0 for v in r.temperatures), "rae.temperatures", "positive numbers", r.temperatures)
    from dexml.metrics import EVAL_KEYS  # numpy only

    need(r.metric in EVAL_KEYS, "rae.metric", f"one of {list(EVAL_KEYS)}", r.metric)
    need(p.index.type in INDEX_TYPES or _faiss_can_parse(p.index.type), "index.type",
         f"one of {list(INDEX_TYPES)} or a faiss index factory string such as \"HNSW32,Flat\"", p.index.type)
    need(p.index.classifier_gamma >= 0, "index.classifier_gamma", "a number >= 0", p.index.classifier_gamma)
    need(p.index.refine_k_factor >= 1, "index.refine_k_factor", "a number >= 1", p.index.refine_k_factor)
    for key in ("ivf_nlist", "pq_m"):
        need(getattr(p.index, key) >= 0, f"index.{key}", "0 (automatic) or a positive integer", getattr(p.index, key))
    # Ranges without which a run fails late (after a full retrain) or silently does nothing.
    d = p.dataset
    for key in ("propensity_a", "propensity_b"):
        value = getattr(d, key)
        need(value is None or value > 0, f"dataset.{key}", "null or a positive number", value)
    need(s.zipf_exponent >= 0, "dataset.synthetic.zipf_exponent", "a number >= 0", s.zipf_exponent)
    need(t.max_steps is None or t.max_steps > 0, "train.max_steps", "null or a positive integer", t.max_steps)
    need(t.val_max_points > 0, "train.val_max_points", "a positive integer", t.val_max_points)
    need(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "null or a positive number", t.grad_clip)
    need(t.num_threads >= 0, "train.num_threads", "0 (torch's default) or a positive integer", t.num_threads)
    need(t.nnodes >= 1, "train.nnodes", "a positive integer", t.nnodes)
    need(0 <= t.node_rank < t.nnodes, "train.node_rank", f"an integer in [0, train.nnodes = {t.nnodes})", t.node_rank)
    need(1 <= t.master_port <= 65535, "train.master_port", "a port number in 1..65535", t.master_port)
    lo, hi = OPSET_RANGE
    need(lo <= p.export.opset <= hi, "export.opset", f"an ONNX opset in {lo}..{hi} (what the exporter writes "
         "for BERT-style encoders)", p.export.opset)
    need(p.evaluate.k <= MAX_K, "evaluate.k", f"an integer in 5..{MAX_K}", p.evaluate.k)
    need(r.k <= MAX_K, "rae.k", f"an integer in 1..{MAX_K}", r.k)
    f = p.flow
    need(f.gate_metric in EVAL_KEYS, "flow.gate_metric", f"one of {list(EVAL_KEYS)}", f.gate_metric)
    need(f.min_delta >= 0, "flow.min_delta", "a number >= 0 (percentage points)", f.min_delta)
    for name, tol in f.guarded.items():
        need(name in EVAL_KEYS, f"flow.guarded.{name}", f"a metric name, one of {list(EVAL_KEYS)}", name)
        need(not isinstance(tol, bool) and isinstance(tol, (int, float)) and tol >= 0, f"flow.guarded.{name}",
             "a tolerance >= 0 (percentage points)", tol)
    problem = cron_problem(f.cron)
    need(problem is None, "flow.cron", f"a cron expression of 5 fields (minute hour day month weekday), {problem}",
         f.cron)
    need(_is_timezone(f.timezone), "flow.timezone", "an IANA time zone name, e.g. UTC or Europe/Paris", f.timezone)
    need(f.download_retries >= 0, "flow.download_retries", "an integer >= 0", f.download_retries)
    need(f.download_retry_delay >= 0, "flow.download_retry_delay", "a number of seconds >= 0", f.download_retry_delay)
    e = p.export
    need(1 <= e.variant_repeats <= 100, "export.variant_repeats", "an integer in 1..100", e.variant_repeats)
    need(0 <= e.ort_threads <= 256, "export.ort_threads", "0 (all cores) or a thread count up to 256", e.ort_threads)
    check_serve(p.serve)


def check_serve(v: ServeParams) -> None:
    """Range checks of the serve section (also run on `dexml serve`'s flags)."""

    def need(cond: bool, key: str, expected: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"params key `serve.{key}`: expected {expected}, got {value!r}")

    need(bool(v.host), "host", "a host name or address", v.host)
    need(0 <= v.port <= 65535, "port", "a port number in 0..65535 (0: any free port)", v.port)
    need(1 <= v.max_batch <= 4096, "max_batch", "an integer in 1..4096", v.max_batch)
    need(0 <= v.max_wait_ms <= 1000, "max_wait_ms", "milliseconds in 0..1000", v.max_wait_ms)
    need(1 <= v.queue_size <= 100_000, "queue_size", "an integer in 1..100000", v.queue_size)
    need(0 < v.timeout_s <= 3600, "timeout_s", "seconds in (0, 3600]", v.timeout_s)
    need(1 <= v.max_texts <= 10_000, "max_texts", "an integer in 1..10000", v.max_texts)
    need(1 <= v.max_chars <= 1_000_000, "max_chars", "an integer in 1..1000000", v.max_chars)
    need(1024 <= v.max_body_bytes <= 1 << 30, "max_body_bytes", "bytes in 1024..1073741824", v.max_body_bytes)
    need(1 <= v.max_k <= MAX_K, "max_k", f"an integer in 1..{MAX_K}", v.max_k)
    need(1 <= v.default_k <= v.max_k, "default_k", f"an integer in 1..serve.max_k ({v.max_k})", v.default_k)
    need(0 < v.watch_interval_s <= 3600, "watch_interval_s", "seconds in (0, 3600]", v.watch_interval_s)
    need(0 <= v.drain_s <= 3600, "drain_s", "seconds in 0..3600", v.drain_s)
    need(0 <= v.threads <= 256, "threads", "0 (as the bundle records) or a thread count up to 256", v.threads)


# Cron fields (what Prefect's schedules accept): minute, hour, day of month, month, weekday.
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
                ("weekday", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def cron_problem(expr: str) -> str | None:
    """What is wrong with a cron expression (None when it is valid)."""
    if expr.strip().lower() in _CRON_ALIASES:
        return None
    fields = expr.split()
    if len(fields) != 5:
        return f"got {len(fields)} field{'s' if len(fields) != 1 else ''}"
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return f"the {name} field has a bad step {part!r}"
            if base == "*" or (base in ("?", "L") and name in ("day of month", "weekday")):
                continue
            if name == "weekday" and "#" in base:  # the n-th weekday of the month: 5#3
                base, _, nth = base.partition("#")
                if not (nth.isdigit() and 1 <= int(nth) <= 5):
                    return f"the {name} field {part!r} has a bad #n (1..5)"
            ends = base.split("-")  # a range may wrap around (fri-mon), as croniter reads it
            values = [names.index(e.lower()) + (lo if name == "month" else 0) if e.lower() in names
                      else int(e) if e.isdigit() else None for e in ends]
            if len(ends) > 2 or None in values or not all(lo <= v <= hi for v in values):
                return f"the {name} field {part!r} is not in {lo}..{hi}" + (f" or {names[0]}..{names[-1]}" if names else "")
    return None


def _is_timezone(name: str) -> bool:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _faiss_can_parse(factory: str) -> bool:
    """Whether faiss's index factory parses `factory` (sizes are checked by the index stage, which
    knows the dimension); True without faiss installed (the index stage will say)."""
    if not isinstance(factory, str) or not factory.strip():
        return False
    try:
        import faiss
    except ImportError:
        return True
    try:
        faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        return "index_factory" not in str(e)  # a parse error, not a dimension constraint
    return True


def parse_params(raw: dict | None) -> Params:
    p = _build(Params, raw or {}, "")
    _check(p)
    return p


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read params.yaml, apply dotted-key `overrides` ({"train.lr": 1e-4}), validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"params file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file {path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        return parse_params(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_overrides(items: list[str] | None) -> dict:
    """`-S train.lr=1e-4` -> {"train.lr": 0.0001}: each value parsed by the type of the field it
    sets (`dataset.path=2024` stays the string "2024", `train.lr=1e-4` is a float, `null` clears
    an optional field); keys that name no field keep YAML's reading, and load_params names them."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        out[key] = _parse_value(value, _field_type(key), f"override `{key}={value}`")
    return out


_NULLS = ("null", "Null", "NULL", "~", "")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _field_type(dotted: str) -> Any:
    """The annotation of the params field a dotted key names (None if it names none)."""
    tp: Any = Params
    for part in dotted.split("."):
        if tp is dict:  # an entry of a free mapping (flow.guarded.P@1): YAML decides
            return None
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_value(text: str, tp: Any, where: str) -> Any:
    """The command-line string `text` as a value of type `tp` (YAML's reading when tp is None)."""
    def fail(expected: str):
        raise ConfigError(f"{where}: expected {expected}, got {text!r}")

    def yaml_value():
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a valid YAML value ({e})") from None

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip() in _NULLS:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(tp)
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low not in _TRUE + _FALSE:
            fail("true or false")
        return low in _TRUE
    if tp is int:
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            try:  # 1e5 names an integer too
                number = float(text)
            except ValueError:
                number = None
            if number is None or not number.is_integer():
                fail("an integer")
            return int(number)
    if tp is float:
        try:
            return float(text.strip().replace("_", ""))
        except ValueError:
            fail("a number")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text.strip():
                return choice
        fail(f"one of {list(typing.get_args(tp))}")
    value = yaml_value()
    if origin is list and isinstance(value, list):
        (inner,) = typing.get_args(tp)
        return [_parse_value(v, inner, f"{where}[{i}]") if isinstance(v, str) and inner is not str else v
                for i, v in enumerate(value)]
    return value


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override `{dotted}`: `{part}` is not a mapping")
    node[last] = value

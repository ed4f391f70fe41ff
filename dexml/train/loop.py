"""The training loop: dataset -> trained dual encoder (the `train` stage).

One step (`train_step`): encode the batch's queries with autograd; ask the negative mode's pool
which labels to encode with gradients ("fresh": every pool label, or for `cached` the positives
and the hardest cached negatives); the loss over the pool (`pool_loss`, label-chunked) then
back-propagates into the queries, the fresh labels and the per-label bias. When the fresh labels
fit in one `negatives.label_chunk` they are encoded once, with autograd. Beyond that they are
encoded in chunks without autograd (recording each chunk's RNG state), the loss gives the
gradient with respect to their embeddings, and each chunk is re-encoded with autograd under its
recorded RNG state (same dropout) to back-propagate it: parameter gradients equal the naive full
backward's while activation memory holds one label chunk at a time (gradient caching).

The loop knows nothing about shortlists or caches: it calls `mode.refresh(model, epoch, step)`
and `mode.pool(rows, ...)` of the negative mode (dexml/train/negatives.py).

Under torchrun (`train.nproc` > 1, see dexml/train/distributed.py and docs/distributed.md) each process
takes its share of the batch's queries and its shard of the label pool; rank 0 validates,
refreshes the hard-negative shortlist and writes checkpoints and outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dexml import fileio, paths
from dexml.config import Params
from dexml.data.dataset import read_dataset, split_validation
from dexml.errors import ConfigError
from dexml.train import distributed, negatives
from dexml.train.losses import pool_loss
from dexml.train.model import DualEncoder
from dexml.train.negatives import LabelPool
from dexml.train.retrieval import embed_tokens, top_k
from dexml.train.tokens import TokenizedTexts, cached_tokenize

__all__ = ["embed_tokens", "train", "train_step", "validate"]


# ---------------------------------------------------------------- devices and RNG
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params key `train.device`: {name!r} requested but no CUDA device is available")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA (amp=auto) or wherever amp=bf16; otherwise a no-op context."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class RngState:
    """Torch RNG state (CPU and the CUDA device) captured now, restorable later."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


# ---------------------------------------------------------------- one step
def train_step(model: DualEncoder, q_ids, q_mask, label_tok: TokenizedTexts, pool: LabelPool, loss_name: str,
               chunk: int, device: torch.device, autocast=contextlib.nullcontext, group=None, **loss_opts) -> float:
    """Forward + backward for one batch (gradients accumulate in the parameters); returns the loss.

    With a process group, `q_ids`/`q_mask` are this rank's share of the batch's queries and `pool`
    its shard of the label pool (all the batch's rows): the queries are gathered from all ranks and
    the loss reduces over every rank's shard. The gradients then need averaging over ranks
    (`Context.average_gradients`)."""
    dim = model.meta.dim
    with autocast():
        # A rank's share of a last batch smaller than the world can be empty.
        q = model.encode_queries(q_ids, q_mask) if len(q_ids) else torch.zeros(0, dim, device=device)
    q = distributed.gather_rows(q.float(), group)
    fresh = None if pool.fresh is None else pool.fresh_positions(q.detach())  # None: every label
    ids = pool.labels if fresh is None else pool.labels[fresh]
    pool.encoded = len(ids)
    states = None
    if len(ids) == 0:
        emb = torch.zeros(0, dim, device=device)
    elif len(ids) <= chunk:  # one encode, with autograd
        with autocast():
            emb = model.encode_labels(*label_tok.batch(ids, device)).float()
    else:  # gradient caching: no-grad chunks now, re-encoded with autograd after the loss
        states, emb = [], torch.empty(len(ids), dim, device=device)  # filled in place: one copy of (P, d)
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                states.append(RngState(device))
                with autocast():
                    emb[start:start + chunk] = model.encode_labels(*label_tok.batch(ids[start:start + chunk], device))
        after = RngState(device)
        emb.requires_grad_()
    table = pool.table
    bias = None if model.label_bias is None else model.label_bias(torch.from_numpy(pool.labels).to(device))
    if table is None:  # the fresh labels are the whole pool
        labels, replace = emb, None
    else:  # the fresh embeddings stand in for their cached rows in this step's scores (table untouched)
        labels = table
        replace = (torch.from_numpy(fresh).to(table.device), emb) if len(fresh) else None
    loss = pool_loss(loss_name, q, labels, pool.positives, pool.masked, scale=1.0 / model.meta.tau, bias=bias,
                     group=group, fresh=replace, **loss_opts)
    if model.classifier is not None:  # same loss, same pool; the table rows' gradient waits for classifier.step
        head = model.classifier
        loss = loss + head.loss_weight * pool_loss(loss_name, head.query(q), head.pool_rows(pool.labels),
                                                   pool.positives, pool.masked, scale=1.0 / model.meta.tau,
                                                   group=group, **loss_opts)
    loss.backward()
    if states is not None:  # back-propagate the embeddings' gradient chunk by chunk
        for i, start in enumerate(range(0, len(ids), chunk)):
            states[i].restore()
            with autocast():
                part = model.encode_labels(*label_tok.batch(ids[start:start + chunk], device))
            part.backward(emb.grad[start:start + chunk].to(part.dtype))
        after.restore()
    return float(loss.detach())


# ---------------------------------------------------------------- evaluation on the validation split
@torch.no_grad()
def validate(model: DualEncoder, q_tok, q_rows, label_tok, y_val: sp.csr_matrix, device, autocast, k: int = 5) -> dict:
    """P@1 / P@5 (percent) of exact retrieval over all labels, for model selection (top-k over
    label chunks: no validation queries x labels matrix)."""
    from dexml.metrics import scores_to_csr, xmc_metrics

    was_training = model.training
    model.eval()
    labels = embed_tokens(model.encode_labels, label_tok, np.arange(len(label_tok)), device, autocast=autocast)
    queries = embed_tokens(model.encode_queries, q_tok, q_rows, device, autocast=autocast)
    model.train(was_training)
    bias = None if model.label_bias is None else model.label_bias().detach()
    labels, bias = model.ranking_vectors(labels, bias)  # the classifier head folded in, as served
    vals, inds = top_k(queries, labels, k, scale=1.0 / model.meta.tau, bias=bias)
    vals, inds = vals.cpu().numpy(), inds.cpu().numpy()
    m = xmc_metrics(scores_to_csr(vals, inds, y_val.shape[1]), y_val, None, ks=(1, 5), recall_ks=(5,))
    return {"P@1": m["P@1"], "P@5": m["P@5"]}


# ---------------------------------------------------------------- schedule, checkpoint
def make_optimizer(model, p: Params, total_steps: int):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 else decay).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.train.lr)
    warmup = int(p.train.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fingerprint(p: Params, data_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training params and the dataset's bytes."""
    ignored = ("num_threads", "node_rank", "master_addr", "master_port")  # differ per node or run, not the math
    h = hashlib.sha256(json.dumps({k: asdict(getattr(p, k)) for k in ("data", "model", "loss", "negatives")}
                                  | {"train": {k: v for k, v in asdict(p.train).items() if k not in ignored}},
                                  sort_keys=True).encode())
    for name in ("trn.json.gz", "lbl.json.gz"):
        with open(data_dir / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:24]


def save_checkpoint(path: Path, state: dict) -> None:
    with fileio.atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fp: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: start over rather than crash
        print(f"train: ignoring unreadable checkpoint {path} ({e})", file=sys.stderr)
        return None
    if state.get("fingerprint") != fp:
        print(f"train: checkpoint {path} is for other params or data; starting over", file=sys.stderr)
        return None
    return state


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    fileio.write_text(path, ",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))


# ---------------------------------------------------------------- the loop
def train(p: Params, root: str | Path = ".") -> dict:
    """Train per params; write the model, metrics and plots under `root`. Returns the metrics.

    Inside torchrun this process joins the process group and trains its part of every step."""
    root = Path(root)
    data_dir = root / p.data.dir if not Path(p.data.dir).is_absolute() else Path(p.data.dir)
    ds = read_dataset(data_dir)
    L = ds.num_labels
    if p.loss.name == "soft_topk" and p.loss.k >= L:
        raise ConfigError(f"params key `loss.k`: soft_topk needs k < number of labels ({L}), got {p.loss.k}")
    with distributed.setup(resolve_device(p.train.device)) as ctx:
        return _train(p, root, data_dir, ds, ctx)


def _train(p: Params, root: Path, data_dir: Path, ds, ctx: distributed.Context) -> dict:
    device = ctx.device
    L = ds.num_labels
    if p.train.num_threads:
        torch.set_num_threads(p.train.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = lambda: autocast_for(device, p.train.amp)  # noqa: E731
    torch.manual_seed(p.train.seed)
    rng = np.random.default_rng(p.train.seed)  # shared decisions: the same on every rank

    # Validation rows carved from the training split (never the test split).
    y = ds.trn.labels.tocsr()
    val_rows, train_rows = split_validation(rng, len(ds.trn), p.train.val_fraction, p.train.val_max_points)
    train_rows = np.sort(train_rows[np.diff(y.indptr)[train_rows] > 0])  # rows with a positive

    model = DualEncoder.from_params(p.model, train_labels=y).to(device)
    model.train()
    ctx.broadcast_parameters(model)
    cache = root / paths.TOKEN_CACHE_DIR
    q_tok = cached_tokenize(ds.trn.texts(p.data.query_text), model.tokenizer, p.model.query_max_len, cache)
    l_tok = cached_tokenize(ds.lbl.texts(p.data.label_text), model.tokenizer, p.model.label_max_len, cache)
    if model.classifier is not None and p.model.classifier_init == "embedding":
        model.eval()
        model.classifier.init_table(embed_tokens(model.encode_labels, l_tok, np.arange(len(l_tok)), device,
                                                 autocast=autocast))
        model.train()

    bs = p.train.batch_size  # the global batch, shared out over the ranks
    steps_per_epoch = math.ceil(len(train_rows) / bs)
    total_steps = steps_per_epoch * p.train.epochs
    if p.train.max_steps:
        total_steps = min(total_steps, p.train.max_steps)
    opt, sched = make_optimizer(model, p, total_steps)
    loss_opts = p.loss.options()
    mode = negatives.make_mode(negatives.Setup(p.negatives, p.train.sample_positives, L, l_tok, q_tok, train_rows,
                                               y, device, autocast, ctx))

    ckpt_dir = root / paths.CHECKPOINT_DIR
    ckpt_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.safetensors"
    fp = fingerprint(p, data_dir)
    state = load_checkpoint(ckpt_path, fp)
    start_epoch, step, best, history = 0, 0, {"score": -1.0, "epoch": -1}, {"loss": [], "val": [], "time": 0.0, "examples": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        rng.bit_generator.state = state["rng_numpy"]
        start_epoch, step, best, history = state["epoch"] + 1, state["step"], state["best"], state["history"]
        if ctx.is_main:
            print(f"train: resuming after epoch {start_epoch} (step {step}) from {ckpt_path}", file=sys.stderr)
    ctx.check_same(start_epoch, f"the epoch to resume from ({ckpt_path}; with train.nnodes > 1 every node "
                                f"needs the same work directory, e.g. on shared storage)")

    for epoch in range(start_epoch, p.train.epochs):
        if step >= total_steps:
            break
        ctx.seed_dropout(p.train.seed, epoch)
        order = train_rows[rng.permutation(len(train_rows))]
        bar = tqdm(range(0, len(order), bs), desc=f"epoch {epoch + 1}/{p.train.epochs}", unit="batch",
                   mininterval=1.0 if sys.stderr.isatty() else 10.0, leave=True, disable=not ctx.is_main)
        t0, seen = time.perf_counter(), 0
        for step_in_epoch, start in enumerate(bar):
            if step >= total_steps:
                break
            rows = order[start:start + bs]
            t_refresh = time.perf_counter()
            mode.refresh(model, epoch, step_in_epoch)  # shortlist / label-cache lifecycle
            history["refresh_s"] = history.get("refresh_s", 0.0) + time.perf_counter() - t_refresh
            pool = mode.pool(rows, y[rows], rng)  # this rank's shard
            q_ids, q_mask = q_tok.batch(ctx.share(rows), device)
            loss = train_step(model, q_ids, q_mask, l_tok, pool, p.loss.name, p.negatives.label_chunk,
                              device, autocast, group=ctx.group, **loss_opts)
            ctx.average_gradients(model)
            if p.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.train.grad_clip)
            opt.step()
            if model.classifier is not None:  # row-wise Adagrad on the pool's rows, on train's schedule
                model.classifier.step(sched.get_last_lr()[0] / p.train.lr, ctx.group, 1.0 / ctx.world)
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(rows)
            history["loss"].append([step, round(loss, 6), f"{sched.get_last_lr()[0]:.3g}"])
            # refresh=False: redraw at tqdm's own interval, not every step (fast GPU steps flood logs)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
        bar.close()
        history["time"] += time.perf_counter() - t0
        history["examples"] += seen

        if ctx.is_main:  # the others wait at the barrier
            val = validate(model, q_tok, val_rows, l_tok, y[val_rows], device, autocast)
            history["val"].append([epoch + 1, round(val["P@1"], 4), round(val["P@5"], 4)])
            print(f"train: epoch {epoch + 1} val P@1 {val['P@1']:.2f} P@5 {val['P@5']:.2f}", file=sys.stderr)
            if val["P@5"] > best["score"]:
                best = {"score": val["P@5"], "epoch": epoch + 1, "P@1": val["P@1"], "P@5": val["P@5"]}
                with fileio.atomic_path(best_path, suffix=".safetensors") as tmp:
                    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
            save_checkpoint(ckpt_path, {
                "fingerprint": fp, "epoch": epoch, "step": step, "best": best, "history": history,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_numpy": rng.bit_generator.state,
                **({"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            })
        ctx.barrier()

    metrics = {
        "epochs": p.train.epochs, "steps": step, "best_epoch": best["epoch"],
        "val_P@1": best.get("P@1"), "val_P@5": best.get("P@5"),
        "examples_per_s": round(history["examples"] / max(history["time"], 1e-9), 2),
        "train_time_s": round(history["time"], 1), "refresh_time_s": round(history.get("refresh_s", 0.0), 1),
        "device": str(device), "processes": ctx.world,
        "peak_memory_mb": round(_peak_memory_mb(device), 1), "negatives": mode.diagnostics(),
    }
    if ctx.is_main:
        # The selected (best validation) model becomes the stage's output.
        if best_path.exists():
            model.load_state_dict(load_file(best_path))
        with fileio.atomic_dir(root / paths.MODEL_DIR) as tmp:
            model.cpu().save(tmp)
        plots = root / paths.TRAIN_PLOTS
        _write_csv(plots / "loss.csv", ["step", "loss", "lr"], history["loss"])
        _write_csv(plots / "val.csv", ["epoch", "P@1", "P@5"], history["val"])
        fileio.write_json(root / paths.TRAIN_METRICS, metrics)
        # The held-out rows are a contract: evaluate tunes retrieval augmentation on exactly these.
        fileio.write_json(root / paths.HELDOUT_ROWS, {"num_train": len(ds.trn), "rows": val_rows.tolist()})
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: a rerun starts fresh
    ctx.barrier()
    return metrics


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

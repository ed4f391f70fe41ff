"""Several processes, GPUs or machines for one training run, through torch.distributed.

`dexml train` with `train.nproc * train.nnodes > 1` re-runs itself under `torchrun`; each child
finds torchrun's environment (RANK, WORLD_SIZE, ...) and joins the process group (NCCL on GPUs,
gloo on CPU). Outside torchrun a world of one has no process group and every helper here is a
no-op, so the single-process path is plain PyTorch.

The split of one training step (see `dexml.train.loop.train_step`):
- data parallel over queries: each rank encodes its share of the global batch;
- the step's label pool (decided identically on every rank from the shared numpy RNG: batch
  order, positive sampling, hard negatives) is split into contiguous shards, one per rank
  (dexml.train.negatives.shard; `cached` keeps each rank's label shard in its table);
  each rank encodes only its shard's fresh labels;
- query embeddings are all-gathered with a differentiable gather, each rank scores all queries
  against its label shard, and `dexml.losses` reduces over the shards (group argument);
- backward then gives every rank world_size x the gradient of the global loss with respect to
  its own inputs (every rank back-propagates the same loss through sum-collectives); averaging
  the parameter gradients over ranks, as DDP does, leaves exactly the 1-process gradient.
Nothing else in dexml knows about ranks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from dexml.config import TrainParams
from dexml.errors import ConfigError

# torch >= 2.10 marks the differentiable collectives of torch.distributed.nn.functional (used here and
# in dexml.losses) deprecated in favour of the private _functional_collectives; they still work.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)

# Rank 0 alone validates, refreshes the hard-negative shortlist and writes checkpoints while the
# others wait in a barrier: on large label sets that takes far longer than torch's default timeout.
GROUP_TIMEOUT = timedelta(hours=2)


# ---------------------------------------------------------------- launching
def in_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def should_launch(t: TrainParams) -> bool:
    return t.nproc * t.nnodes > 1 and not in_torchrun()


def is_main_process() -> bool:
    """Rank 0, or the only process (for output that one process should print)."""
    return int(os.environ.get("RANK", "0")) == 0


def torchrun_command(t: TrainParams, params_path: str, overrides: list[str]) -> list[str]:
    """The argument list that runs `dexml train` under torchrun, one process per local GPU/slot."""
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", str(t.nproc), "--nnodes", str(t.nnodes), "--node_rank", str(t.node_rank),
           "--master_addr", t.master_addr, "--master_port", str(t.master_port),
           "-m", "dexml.cli", "train", "--params", str(params_path)]
    for item in overrides:
        cmd += ["-S", item]
    return cmd


def launch(t: TrainParams, params_path: str, overrides: list[str], cwd=None) -> int:
    """Run torchrun for this node (in `cwd`) and wait; its exit status (non-zero if any rank failed)."""
    cmd = torchrun_command(t, params_path, overrides)
    print(f"train: launching {t.nproc} process(es) on node {t.node_rank} of {t.nnodes} with torchrun",
          file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=cwd)
    # Stopping this process (Ctrl-C, a scheduler's SIGTERM) must stop torchrun, which stops its
    # workers (they run in sessions of their own): pass the signal on and wait for it to finish.
    forward = {}
    if threading.current_thread() is threading.main_thread():
        forward = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
                   for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, previous in forward.items():
            signal.signal(s, previous)


# ---------------------------------------------------------------- the process group
@dataclass
class Context:
    """This process's place in the run; the defaults are the single process (no group)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    group: object | None = None  # torch.distributed group (None = this process only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        if self.group is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # --- splitting a step
    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a batch's rows (sizes differ by at most one)."""
        return np.array_split(rows, self.world)[self.rank] if self.group is not None else rows

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Parameter gradients averaged over ranks in one all-reduce (missing ones count as 0)."""
        if self.group is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    # --- coordination
    def barrier(self) -> None:
        if self.group is None:
            return
        if self.device.type == "cuda":
            torch.distributed.barrier(group=self.group, device_ids=[self.device.index])
        else:
            torch.distributed.barrier(group=self.group)

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Every rank starts from rank 0's weights and buffers (as DDP does)."""
        if self.group is None:
            return
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, 0, group=self.group)

    def from_main(self, compute, shape: tuple, dtype) -> np.ndarray:
        """`compute()` run on rank 0 only, its array (of `shape`, `dtype`) sent to every rank."""
        if self.group is None:
            return compute()
        if self.is_main:
            out = torch.from_numpy(np.ascontiguousarray(compute(), dtype=dtype)).to(self.device)
            if tuple(out.shape) != tuple(shape):
                raise ValueError(f"from_main: computed shape {tuple(out.shape)}, announced {tuple(shape)}")
        else:
            out = torch.from_numpy(np.empty(shape, dtype)).to(self.device)
        torch.distributed.broadcast(out, 0, group=self.group)
        return out.cpu().numpy()

    def check_same(self, value: int, what: str) -> None:
        """Raise (on every rank) unless all ranks hold the same integer `value`."""
        if self.group is None:
            return
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(everyone, mine, group=self.group)
        values = [int(v) for v in everyone]
        if len(set(values)) > 1:
            raise ConfigError(f"{what}: ranks disagree (per rank: {values})")

    def seed_dropout(self, seed: int, epoch: int) -> None:
        """Per rank and epoch torch RNG (dropout masks differ across ranks, a resumed run continues
        exactly). Shared decisions use the numpy RNG, identical on all ranks."""
        if self.group is None:
            return
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0]))


def setup(device: torch.device) -> Context:
    """Join torchrun's process group if started by torchrun (NCCL on CUDA, gloo on CPU), with each
    local process on its own GPU; otherwise the single-process context for `device`."""
    if not in_torchrun():
        return Context(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT,
                                             device_id=device if device.type == "cuda" else None)
    return Context(device, rank, world, torch.distributed.group.WORLD)


# ---------------------------------------------------------------- the differentiable gather
def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `x` (rows may differ in number), concatenated in rank order; backward sends each
    rank the sum over ranks of the gradient of its own rows. `x` itself when group is None."""
    if group is None:
        return x
    import torch.distributed.nn.functional as dist_fn

    world = torch.distributed.get_world_size(group)
    mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - x.shape[0]  # all_gather needs equal shapes
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    if not x.requires_grad:
        # Every rank must take part in the gather's backward exchange, even one with no rows.
        x = x.detach().requires_grad_()
    parts = dist_fn.all_gather(x, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])

"""pool_loss (the losses over label chunks) against the dense losses: same value, same gradients
for queries, labels and bias, in one process and sharded over 2 gloo ranks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from dexml.errors import ConfigError
from dexml.train.losses import LOSSES, pool_loss
from dexml.train.losses.chunked import LabelChunks

OPTS = {"k": 3, "alpha": 2.0}
FRESH_ROWS = [20, 3, 11, 4, 0, 7]  # unsorted; in chunks of 4: two share a chunk, labels 12-19 have none  # params carry these for every loss; only soft_topk takes them
SCALE = 3.0


def make_pool(B=7, P=23, d=5, seed=0, dtype=torch.float64):
    """Random queries, labels, biases; row 0 has no positive, row 1's only positive is masked."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randn(P, d, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(P, generator=g, dtype=torch.float64).to(dtype)
    rng = np.random.default_rng(seed)
    pos = rng.random((B, P)) < 0.15
    mask = rng.random((B, P)) < 0.2
    pos[0] = False
    pos[1], mask[1] = False, False
    pos[1, min(4, P - 1)] = mask[1, min(4, P - 1)] = True
    pos[2, :3] = True  # a row with several positives
    return q, labels, bias, pos, mask


def dense(name, q, labels, bias, pos, mask, opts=OPTS, group=None, grads=(True, True, True)):
    """The dense loss on the full score matrix, and its gradients for q, labels, bias."""
    leaves = [x.detach().clone().requires_grad_(want) if x is not None else None
              for x, want in zip((q, labels, bias), grads)]
    s = SCALE * leaves[0] @ leaves[1].T
    if leaves[2] is not None:
        s = s + leaves[2]
    loss = LOSSES[name](s, torch.from_numpy(pos), None if mask is None else torch.from_numpy(mask), group=group,
                        **({k: v for k, v in opts.items()} if name == "soft_topk" else {}))
    loss.backward()
    return loss.detach(), [None if x is None or not x.requires_grad else x.grad for x in leaves]


def chunked(name, q, labels, bias, pos, mask, chunk, opts=OPTS, group=None, grads=(True, True, True)):
    leaves = [x.detach().clone().requires_grad_(want) if x is not None else None
              for x, want in zip((q, labels, bias), grads)]
    loss = pool_loss(name, leaves[0], leaves[1], sp.csr_matrix(pos), None if mask is None else sp.csr_matrix(mask),
                     scale=SCALE, bias=leaves[2], chunk=chunk, group=group, **opts)
    loss.backward()
    return loss.detach(), [None if x is None or not x.requires_grad else x.grad for x in leaves]


def assert_same(got, expected, rtol=1e-9, atol=1e-11):
    (loss, grads), (loss_ref, grads_ref) = got, expected
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    for g, g_ref, what in zip(grads, grads_ref, ("q", "labels", "bias")):
        assert (g is None) == (g_ref is None), what
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("chunk", [4, 23, 64])  # ragged last chunk, one chunk = P, chunk > P
@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_equals_dense_in_value_and_gradients(name, chunk):
    q, labels, bias, pos, mask = make_pool()
    expected = dense(name, q, labels, bias, pos, mask)
    assert expected[0] > 0 and all(float(g.abs().max()) > 0 for g in expected[1])
    assert_same(chunked(name, q, labels, bias, pos, mask, chunk), expected)


@pytest.mark.parametrize("name", list(LOSSES))
def test_without_bias_mask_or_label_gradients(name):
    """A cached label table (no grad), no bias and no mask: only q gets a gradient."""
    q, labels, _, pos, _ = make_pool(seed=1)
    grads = (True, False, False)
    assert_same(chunked(name, q, labels, None, pos, None, 5, grads=grads),
                dense(name, q, labels, None, pos, None, grads=grads))


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (6, 10.0)])
def test_soft_topk_options(k, alpha):
    q, labels, bias, pos, mask = make_pool(seed=2)
    opts = {"k": k, "alpha": alpha}
    assert_same(chunked("soft_topk", q, labels, bias, pos, mask, 6, opts=opts),
                dense("soft_topk", q, labels, bias, pos, mask, opts=opts), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(LOSSES))
def test_rows_without_positives_and_an_empty_pool_give_zero(name):
    q, labels, bias, pos, mask = make_pool()
    none = np.zeros_like(pos)
    got = chunked(name, q, labels, bias, none, mask, 4)
    if name == "bce":  # bce counts rows without positives: every entry is a negative
        assert_same(got, dense(name, q, labels, bias, none, mask))
    else:
        assert got[0].item() == 0.0 and all((g == 0).all() for g in got[1])
    empty = chunked(name, q, labels[:0], bias[:0], pos[:, :0], mask[:, :0], 4)
    assert empty[0].item() == 0.0 and empty[1][1].shape == (0, q.shape[1]) and (empty[1][0] == 0).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_entries_change_nothing(name):
    q, labels, bias, pos, mask = make_pool(seed=3)
    loss, grads = chunked(name, q, labels, bias, pos, mask, 4)
    flipped = pos ^ mask  # a masked positive is no positive, a masked negative no negative
    assert (flipped != pos).any()
    assert_same(chunked(name, q, labels, bias, flipped, mask, 4), (loss, grads))


@pytest.mark.parametrize("name", list(LOSSES))
def test_fresh_rows_stand_in_for_their_table_rows(name):
    """fresh=(rows, emb) is the dense loss of the table with labels[rows] = emb; emb gets those rows'
    gradient, a table that requires grad gets none for the rows it no longer holds."""
    q, table, bias, pos, mask = make_pool(seed=4)
    rows = np.array(FRESH_ROWS)
    emb = torch.randn(len(rows), table.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    replaced = table.clone()
    replaced[rows] = emb
    loss_ref, (g_q, g_labels, g_bias) = dense(name, q, replaced, bias, pos, mask)
    for table_grad in (False, True):
        leaves = [x.clone().requires_grad_(want) for x, want in ((q, True), (table, table_grad), (bias, True),
                                                                  (emb, True))]
        loss = pool_loss(name, leaves[0], leaves[1], sp.csr_matrix(pos), sp.csr_matrix(mask), scale=SCALE,
                         bias=leaves[2], chunk=4, fresh=(torch.from_numpy(rows), leaves[3]), **OPTS)
        loss.backward()
        expected_table = g_labels.clone()
        expected_table[rows] = 0.0
        assert_same((loss, [leaves[0].grad, leaves[2].grad, leaves[3].grad]), (loss_ref, [g_q, g_bias, g_labels[rows]]))
        assert (leaves[1].grad is None) != table_grad
        if table_grad:
            torch.testing.assert_close(leaves[1].grad, expected_table, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match=r"distinct positions in \[0, 23\)"):
        pool_loss(name, q, table, pos, scale=1.0, fresh=(np.array([1, 1]), emb[:2]), **OPTS)
    with pytest.raises(ValueError, match=r"distinct positions in \[0, 23\)"):
        pool_loss(name, q, table, pos, scale=1.0, fresh=(np.array([23]), emb[:1]), **OPTS)
    with pytest.raises(ValueError, match=r"emb \(len\(rows\), d\), got 2 rows"):
        pool_loss(name, q, table, pos, scale=1.0, fresh=(np.array([1, 2]), emb[:3]), **OPTS)


def test_the_scores_are_never_more_than_one_chunk_wide(monkeypatch):
    widths = []
    scores = LabelChunks.scores

    def spy(self, start, stop, *args):
        widths.append(stop - start)
        return scores(self, start, stop, *args)

    monkeypatch.setattr(LabelChunks, "scores", spy)
    q, labels, bias, pos, mask = make_pool()
    for name in LOSSES:
        chunked(name, q, labels, bias, pos, mask, 5)
    assert max(widths) == 5 and min(widths) == 23 % 5


@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_inputs_give_the_float32_loss_and_bfloat16_gradients(name):
    q, labels, bias, pos, mask = make_pool(dtype=torch.bfloat16)
    loss, grads = chunked(name, q, labels, bias, pos, mask, 4)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    loss32, grads32 = chunked(name, q.float(), labels.float(), bias.float(), pos, mask, 4)
    torch.testing.assert_close(loss, loss32)
    for g, g32 in zip(grads, grads32):
        torch.testing.assert_close(g.float(), g32, rtol=1e-2, atol=1e-2)  # bf16 rounding of the gradient
    ref = dense(name, q.float(), labels.float(), bias.float(), pos, mask)
    assert_same((loss32, grads32), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_large_scores_stay_finite(name):
    q, labels, bias, pos, mask = make_pool(dtype=torch.float32)
    loss, grads = chunked(name, q * 1e3, labels, bias * 1e3, pos, mask, 4)
    assert torch.isfinite(loss) and loss > 0 and all(torch.isfinite(g).all() for g in grads)


def test_labels_changed_in_place_before_backward_are_an_error():
    q, labels, _, pos, mask = make_pool()
    q = q.requires_grad_()
    loss = pool_loss("softmax", q, labels, pos, mask, scale=SCALE, chunk=4)
    labels[0] += 1.0  # the backward would recompute other scores than the forward's
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_arguments_are_named():
    q, labels, bias, pos, mask = make_pool()
    with pytest.raises(ConfigError, match=r"loss\.name.*'hinge'"):
        pool_loss("hinge", q, labels, pos, scale=1.0)
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['kk'\]"):
        pool_loss("softmax", q, labels, pos, scale=1.0, kk=3)
    with pytest.raises(ValueError, match=r"positives must be \(B, P\) = \(7, 23\).*\(7, 22\)"):
        pool_loss("softmax", q, labels, pos[:, :22], scale=1.0)
    with pytest.raises(ValueError, match=r"bias must be \(P,\)"):
        pool_loss("softmax", q, labels, pos, scale=1.0, bias=bias[:3])
    with pytest.raises(ValueError, match=r"k=22.*unmasked entries"):  # as the dense soft_topk says
        pool_loss("soft_topk", q, labels, pos, mask, scale=1.0, k=22)


# --------------------------------------------------------------- sharded over 2 gloo ranks
WORLD = 2
SHARD_CASES = [(name, 23) for name in LOSSES] + [("bce", 1), ("decoupled_softmax", 3), ("soft_topk", 9)]  # P=1: rank 1 empty


def shard_columns(rank: int, num_labels: int) -> slice:
    per = -(-num_labels // WORLD)
    return slice(rank * per, min((rank + 1) * per, num_labels))


def _shard_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = torch.distributed.group.WORLD
    out = {}
    try:
        for name, P in SHARD_CASES:
            q, labels, bias, pos, mask = make_pool(P=P, seed=P)
            cols = shard_columns(rank, P)
            args = (name, q, labels[cols], bias[cols], pos[:, cols], mask[:, cols])
            for kind, (loss, grads) in (("chunked", chunked(*args, chunk=4, group=group)),
                                        ("dense", dense(*args, group=group))):
                out[f"{name}-{P}/{kind}/loss"] = loss
                for what, g in zip(("q", "labels", "bias"), grads):
                    out[f"{name}-{P}/{kind}/{what}"] = g
        # fresh rows on each shard (its own positions) against the dense loss of the replaced shard
        q, labels, bias, pos, mask = make_pool()
        cols = shard_columns(rank, labels.shape[0])
        mine = [r - cols.start for r in FRESH_ROWS if cols.start <= r < cols.stop]
        emb = (labels[cols][mine] + 1.0).requires_grad_()
        replaced = labels[cols].clone()
        replaced[mine] = emb.detach()
        loss_ref, grads_ref = dense("soft_topk", q, replaced, bias[cols], pos[:, cols], mask[:, cols], group=group)
        q_leaf = q.clone().requires_grad_()
        loss = pool_loss("soft_topk", q_leaf, labels[cols], sp.csr_matrix(pos[:, cols]), sp.csr_matrix(mask[:, cols]),
                         scale=SCALE, bias=bias[cols], chunk=4, group=group, fresh=(mine, emb), **OPTS)
        loss.backward()
        out |= {"fresh/loss": loss.detach(), "fresh/q": q_leaf.grad, "fresh/emb": emb.grad,
                "fresh/dense_loss": loss_ref, "fresh/dense_q": grads_ref[0], "fresh/dense_emb": grads_ref[1][mine]}
    finally:
        torch.distributed.destroy_process_group()
    save_file(out, str(Path(out_dir) / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from test_distributed import _spawn, free_port

    out = tmp_path_factory.mktemp("chunked_ranks")
    _spawn((free_port(), str(out)), timeout=300, worker=_shard_worker)
    return [load_file(out / f"rank{r}.safetensors") for r in range(WORLD)]


@pytest.mark.parametrize("name, P", SHARD_CASES)
def test_sharded_chunked_loss_equals_the_dense_sharded_one_and_one_process(shards, name, P):
    q, labels, bias, pos, mask = make_pool(P=P, seed=P)
    loss, (g_q, g_labels, g_bias) = chunked(name, q, labels, bias, pos, mask, 4)
    case = f"{name}-{P}"
    for rank, got in enumerate(shards):
        for what in ("loss", "q", "labels", "bias"):  # a drop-in for the dense loss with a group
            torch.testing.assert_close(got[f"{case}/chunked/{what}"], got[f"{case}/dense/{what}"],
                                       rtol=1e-9, atol=1e-11, msg=f"rank {rank}: {what}")
        torch.testing.assert_close(got[f"{case}/chunked/loss"], loss, rtol=1e-9, atol=1e-11)
        # each rank gets world_size times its shard's gradient, as through the dense losses' all_reduce
        cols = shard_columns(rank, P)
        torch.testing.assert_close(got[f"{case}/chunked/labels"] / WORLD, g_labels[cols], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[f"{case}/chunked/bias"] / WORLD, g_bias[cols], rtol=1e-9, atol=1e-11)
    # q's rows are every rank's: their gradients add up (gather_rows' backward) to world_size x one process's
    torch.testing.assert_close(sum(got[f"{case}/chunked/q"] for got in shards) / WORLD, g_q, rtol=1e-9, atol=1e-11)
    assert loss > 0


def test_sharded_fresh_rows_give_the_dense_sharded_gradients(shards):
    for rank, got in enumerate(shards):
        assert got["fresh/emb"].shape[0] >= 1  # both shards replace rows (5 and 1)
        for what in ("loss", "q", "emb"):
            torch.testing.assert_close(got[f"fresh/{what}"], got[f"fresh/dense_{what}"], rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {what}")

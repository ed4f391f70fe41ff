"""dexml.losses against plain float64 references written out here, plus the properties the paper relies on."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from scipy.optimize import brentq
from scipy.special import expit

from dexml.config import LOSS_TYPES, LossParams
from dexml.errors import ConfigError
from dexml.train.losses import (
    LOSSES,
    bce,
    decoupled_softmax,
    get_loss,
    soft_topk,
    softmax,
)

REPO = Path(__file__).resolve().parents[1]
PER_POSITIVE = ["softmax", "decoupled_softmax", "soft_topk"]  # the losses averaged over positives, then rows


def batch(dtype=torch.float64, scale=3.0, seed=0):
    """5 x 9 scores; row 0 has no positive, row 3 has a masked positive, row 4 has 3 positives."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(5, 9, generator=g) * scale).to(dtype)
    targets = torch.zeros(5, 9)
    for row, cols in {1: [2], 2: [0, 5], 3: [1, 7], 4: [3, 4, 8]}.items():
        targets[row, cols] = 1.0
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[1, 0] = mask[3, 1] = mask[4, 6] = mask[2, 8] = True
    return scores, targets, mask


def loss_fn(name, **opts):
    return get_loss(name, k=3, alpha=2.0, **opts)


# --- plain references: loops over rows and positives, float64, no numerical tricks ---------------------

def rows_of(targets, mask):
    for i in range(targets.shape[0]):
        kept = [j for j in range(targets.shape[1]) if not mask[i, j]]
        pos = [j for j in kept if targets[i, j] > 0]
        if pos:
            yield i, kept, pos


def ref_softmax(s, targets, mask):
    per_row = []
    for i, kept, pos in rows_of(targets, mask):
        denominator = sum(torch.exp(s[i, j]) for j in kept)
        per_row.append(sum(-torch.log(torch.exp(s[i, p]) / denominator) for p in pos) / len(pos))
    return sum(per_row) / len(per_row)


def ref_decoupled_softmax(s, targets, mask):
    per_row = []
    for i, kept, pos in rows_of(targets, mask):
        negatives = sum(torch.exp(s[i, j]) for j in kept if j not in pos)
        per_row.append(sum(-torch.log(torch.exp(s[i, p]) / (torch.exp(s[i, p]) + negatives)) for p in pos) / len(pos))
    return sum(per_row) / len(per_row)


def ref_soft_topk(s, targets, mask, k, alpha):
    per_row = []
    for i, kept, pos in rows_of(targets, mask):
        row = s[i, kept]
        values = row.detach().tolist()
        t0 = brentq(lambda t: sum(expit(alpha * (v + t)) for v in values) - k, -1e3, 1e3, xtol=1e-15)
        # One Newton step from the exact root: same value, and autograd through it gives the
        # implicit-function gradient dt/ds = -(dF/ds) / (dF/dt).
        p = torch.sigmoid(alpha * (row + t0))
        t = t0 - (p.sum() - k) / (alpha * p * (1 - p)).sum()
        per_row.append(sum(-torch.log(torch.sigmoid(alpha * (s[i, q] + t))) for q in pos) / len(pos))
    return sum(per_row) / len(per_row)


def ref_bce(s, targets, mask):
    terms = [-torch.log(torch.sigmoid(s[i, j])) if targets[i, j] > 0 else -torch.log(1 - torch.sigmoid(s[i, j]))
             for i in range(s.shape[0]) for j in range(s.shape[1]) if not mask[i, j]]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("name, reference, opts", [
    ("softmax", ref_softmax, {}),
    ("decoupled_softmax", ref_decoupled_softmax, {}),
    ("soft_topk", ref_soft_topk, {"k": 1, "alpha": 0.5}),
    ("soft_topk", ref_soft_topk, {"k": 3, "alpha": 2.0}),
    ("soft_topk", ref_soft_topk, {"k": 6, "alpha": 10.0}),
    ("bce", ref_bce, {}),
])
def test_matches_the_plain_reference_in_value_and_gradient(name, reference, opts):
    scores, targets, mask = batch()
    s = scores.clone().requires_grad_()
    loss = LOSSES[name](s, targets, mask, **opts)
    loss.backward()
    s_ref = scores.clone().requires_grad_()
    expected = reference(s_ref, targets, mask, **opts)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-8, atol=1e-10)  # t is ill-conditioned at alpha=10
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (4, 3.0)])
def test_soft_topk_passes_gradcheck(k, alpha):
    scores, targets, mask = batch(scale=1.0)
    s = scores.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, targets, mask, k=k, alpha=alpha), (s,))


def test_decoupled_softmax_ignores_the_other_positives_and_softmax_does_not():
    s = torch.tensor([[1.0, 0.5, -0.3, 0.2, -1.0, 0.7]], dtype=torch.float64)
    only_0, only_1, both = torch.zeros(1, 6), torch.zeros(1, 6), torch.zeros(1, 6)
    only_0[0, 0] = only_1[0, 1] = both[0, 0] = both[0, 1] = 1.0
    hide_0, hide_1 = torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)
    hide_0[0, 0] = hide_1[0, 1] = True

    # Positive 0's term inside the two-positive loss, for each loss.
    def decoupled_term_0(x):
        return decoupled_softmax(x, only_0, hide_1)  # positive 1 is no competitor of positive 0

    def softmax_term_0(x):
        return softmax(x, only_0)  # positive 1 stays in the denominator

    torch.testing.assert_close(decoupled_softmax(s, both),
                               (decoupled_term_0(s) + decoupled_softmax(s, only_1, hide_0)) / 2)
    torch.testing.assert_close(softmax(s, both), (softmax_term_0(s) + softmax(s, only_1)) / 2)

    raised = s.clone()
    raised[0, 1] += 3.0
    torch.testing.assert_close(decoupled_term_0(raised), decoupled_term_0(s))
    assert softmax_term_0(raised) > softmax_term_0(s) + 1.0
    assert decoupled_softmax(raised, both) < decoupled_softmax(s, both)  # only positive 1's term falls


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_entries_change_nothing(name):
    scores, targets, mask = batch()
    s = scores.clone().requires_grad_()
    loss = loss_fn(name)(s, targets, mask)
    loss.backward()
    assert (s.grad[mask] == 0).all()

    changed = scores.clone()
    changed[mask] = torch.tensor([1e3, -1e3, 50.0, 7.0], dtype=changed.dtype)
    flipped = targets.clone()
    flipped[mask] = 1.0 - flipped[mask]  # a masked positive is no positive, a masked negative no negative
    torch.testing.assert_close(loss_fn(name)(changed, flipped, mask), loss.detach())


@pytest.mark.parametrize("name", PER_POSITIVE)
def test_rows_weigh_the_same_whatever_their_number_of_positives(name):
    scores, targets, _ = batch()
    two, one = [2], [1]  # rows with 2 and 1 positives
    f = loss_fn(name)
    together = f(scores[two + one], targets[two + one])
    torch.testing.assert_close(together, (f(scores[two], targets[two]) + f(scores[one], targets[one])) / 2)
    # and within a row, each positive weighs the same: the row's loss is the mean of single-positive terms
    if name != "decoupled_softmax":  # for decoupled a positive's term also drops the other positives
        singles = []
        for col in targets[2].nonzero().flatten():
            single = torch.zeros_like(targets[two])
            single[0, col] = 1.0
            singles.append(f(scores[two], single))
        torch.testing.assert_close(f(scores[two], targets[two]), sum(singles) / len(singles))


@pytest.mark.parametrize("name", PER_POSITIVE)
def test_rows_without_positives_are_ignored(name):
    scores, targets, mask = batch()
    s = scores.clone().requires_grad_()
    loss = loss_fn(name)(s, targets, mask)
    loss.backward()
    assert (s.grad[0] == 0).all()  # row 0 has no positive
    torch.testing.assert_close(loss, loss_fn(name)(scores[1:], targets[1:], mask[1:]))

    nothing = loss_fn(name)(s, torch.zeros_like(targets), mask)
    assert nothing.item() == 0.0
    s.grad = None
    nothing.backward()
    assert (s.grad == 0).all()


def test_bce_counts_every_unmasked_entry_even_in_rows_without_positives():
    scores, targets, mask = batch()
    n_all, n_row0 = int((~mask).sum()), int((~mask[0]).sum())
    with_row0 = bce(scores, targets, mask) * n_all
    without_row0 = bce(scores[1:], targets[1:], mask[1:]) * (n_all - n_row0)
    torch.testing.assert_close(with_row0 - without_row0, bce(scores[:1], targets[:1], mask[:1]) * n_row0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_scores_give_the_float32_loss_and_bfloat16_gradients(name):
    scores, targets, mask = batch(dtype=torch.bfloat16)
    s = scores.clone().requires_grad_()
    loss = loss_fn(name)(s, targets, mask)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    s32 = scores.float().requires_grad_()
    loss32 = loss_fn(name)(s32, targets, mask)
    loss32.backward()
    torch.testing.assert_close(loss.float(), loss32)
    torch.testing.assert_close(s.grad.float(), s32.grad, rtol=1e-2, atol=1e-3)  # bf16 rounding of the gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_large_scores_stay_finite(name, dtype):
    scores, targets, mask = batch(dtype=dtype, scale=1e4)
    s = scores.clone().requires_grad_()
    loss = loss_fn(name)(s, targets, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss > 0


def test_soft_topk_rejects_k_outside_the_unmasked_range():
    scores, targets, mask = batch()  # rows with positives keep 8 of 9 entries
    assert torch.isfinite(soft_topk(scores, targets, mask, k=7))
    with pytest.raises(ValueError, match=r"k=8.*8 unmasked"):
        soft_topk(scores, targets, mask, k=8)
    with pytest.raises(ValueError, match="k and alpha must be > 0"):
        soft_topk(scores, targets, mask, k=0)
    sparse = torch.ones_like(mask)
    sparse[0, :2] = False  # a row with no positive and only 2 entries does not matter
    sparse[4] = False
    assert torch.isfinite(soft_topk(scores, targets, sparse, k=5))


def test_mismatched_shapes_are_rejected():
    scores, targets, mask = batch()
    with pytest.raises(ValueError, match=r"scores \(5, 9\), targets \(5, 8\)"):
        softmax(scores, targets[:, :8])
    with pytest.raises(ValueError, match=r"mask \(9,\)"):
        bce(scores, targets, mask[0])


def test_get_loss_builds_each_registered_loss_and_names_the_params_key_for_unknown_ones():
    scores, targets, mask = batch()
    assert set(LOSSES) == {"softmax", "decoupled_softmax", "soft_topk", "bce"}
    torch.testing.assert_close(get_loss("soft_topk", k=2, alpha=0.5)(scores, targets, mask),
                               soft_topk(scores, targets, mask, k=2, alpha=0.5))
    torch.testing.assert_close(get_loss("softmax", k=2, alpha=0.5)(scores, targets, mask),
                               softmax(scores, targets, mask))  # k/alpha are soft_topk's only
    with pytest.raises(ConfigError, match=r"loss\.name.*'hinge'"):
        get_loss("hinge")


# --- the registry: one table (dexml.config.LOSS_TYPES) for config, implementations and docs ------------

def loss_docs_table() -> str:
    """The table docs/losses.md must hold, made from LOSS_TYPES."""
    lines = ["| `loss.name` | options | what it is |", "|---|---|---|"]
    for name, row in LOSS_TYPES.items():
        options = ", ".join(f"`loss.{o}`" for o in row.options) or "-"
        lines.append(f"| `{name}` | {options} | {row.help} |")
    return "\n".join(lines)


def test_the_loss_table_is_the_implementations():
    package = REPO / "dexml" / "train" / "losses"
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "_reduce", "chunked"}
    assert {row.module for row in LOSS_TYPES.values()} == {f"dexml.train.losses.{m}" for m in modules}
    assert list(LOSSES) == list(LOSS_TYPES)
    fields = {f.name for f in dataclasses.fields(LossParams)} - {"name"}
    for name, row in LOSS_TYPES.items():
        module = importlib.import_module(row.module)
        assert LOSSES[name] is module.loss and callable(module.over_chunks), name
        # the options the table names are the ones both forms take, and params carry them
        dense_opts = set(inspect.signature(module.loss).parameters) - {"scores", "targets", "mask", "group"}
        chunked_opts = set(inspect.signature(module.over_chunks).parameters) - {"chunks"}
        assert dense_opts == chunked_opts == set(row.options) and set(row.options) <= fields, name
    assert LossParams(name="soft_topk", k=3).options() == {"k": 3, "alpha": 2.0}
    assert LossParams(name="softmax").options() == {}


def test_params_yaml_and_the_docs_list_the_table():
    line = next(line for line in (REPO / "params.yaml").read_text().splitlines()
                if line.strip().startswith("name: ") and "softmax" in line)
    assert line.split("#", 1)[1].strip() == " | ".join(LOSS_TYPES)
    docs = (REPO / "docs" / "losses.md").read_text()
    assert loss_docs_table() in docs, "docs/losses.md: paste this table:\n" + loss_docs_table()

"""The four MMKD objectives: hand-worked values, loop references, edge cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmkd_ds.losses import (
    MLPHead,
    SentenceHeads,
    StructureHeads,
    byol_loss,
    structure_kl_loss,
    tlm_loss,
    word_infonce_loss,
)

LOW_PRECISION = [torch.float16, torch.bfloat16]


def assert_graph_zero(loss: torch.Tensor, leaf: torch.Tensor) -> None:
    """A 0-dim fp32 zero that backward() accepts and that gives the leaf a (zero) gradient."""
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert leaf.grad is not None and torch.all(leaf.grad == 0)


# --------------------------------------------------------------------------------------------
# token level


def test_tlm_by_hand():
    # row 0: logits [0, 0], label 0 -> p = 1/2 -> CE = ln 2
    # row 1: logits [ln 3, 0], label 0 -> p = 3/4 -> CE = ln(4/3)
    # row 2: label -100 -> ignored whatever its logits
    # mean over the 2 scored rows = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2 ~ 0.4904
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [50.0, -50.0]])
    labels = torch.tensor([0, 0, -100])
    loss = tlm_loss(logits, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-6)


@pytest.mark.parametrize("m,v", [(1, 2), (7, 13), (33, 5)])
def test_tlm_matches_loop(m, v):
    g = torch.Generator().manual_seed(m * 100 + v)
    logits = torch.randn(m, v, generator=g) * 3
    labels = torch.randint(0, v, (m,), generator=g)
    labels[1::3] = -100  # some ignored rows, never all (m = 1 keeps its row)
    terms = []
    for i in range(m):
        if labels[i] == -100:
            continue
        row = [float(x) for x in logits[i]]
        lse = math.log(sum(math.exp(x) for x in row))
        terms.append(lse - row[int(labels[i])])
    expected = sum(terms) / len(terms)
    assert tlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_tlm_empty_and_all_ignored_are_graph_zeros():
    logits = torch.empty(0, 11, requires_grad=True)
    assert_graph_zero(tlm_loss(logits, torch.empty(0, dtype=torch.long)), logits)
    logits = torch.randn(3, 11, requires_grad=True)
    assert_graph_zero(tlm_loss(logits, torch.full((3,), -100)), logits)


def test_tlm_gradient_is_softmax_minus_onehot():
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([1, -100, 5, 0])
    tlm_loss(logits, labels).backward()
    expected = torch.softmax(logits.detach(), -1) - F.one_hot(labels.clamp(min=0), 6)
    expected[1] = 0  # ignored row: no gradient
    torch.testing.assert_close(logits.grad, expected / 3)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_tlm_low_precision_is_fp32_and_close(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 4
    labels = torch.randint(0, 50, (16,), generator=g)
    low = tlm_loss(logits.to(dtype), labels)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # Same rounded inputs in fp32 -> identical maths; vs the fp32 originals -> close.
    assert low.item() == pytest.approx(tlm_loss(logits.to(dtype).float(), labels).item(), rel=1e-6)
    assert low.item() == pytest.approx(tlm_loss(logits, labels).item(), rel=2e-2)


# --------------------------------------------------------------------------------------------
# word level


def _word_loop(student, teacher, valid, target, sim="dot", tau=1.0):
    """The student-anchor form with one mean over every scored word (anchor="student",
    reduction="word"), written as a plain loop."""
    """Plain-Python reference: loop over sentences, words and candidate words."""
    b_, w_, _ = student.shape
    terms = []
    for b in range(b_):
        ks = [k for k in range(w_) if valid[b, k]]
        for j in range(w_):
            if not (valid[b, j] and target[b, j]):
                continue

            def score(k):
                s, t = student[b, j].double(), teacher[b, k].double()
                if sim == "cosine":
                    return float(s @ t / (s.norm() * t.norm())) / tau
                return float(s @ t) / tau

            scores = {k: score(k) for k in ks}
            mx = max(scores.values())
            lse = mx + math.log(sum(math.exp(x - mx) for x in scores.values()))
            terms.append(lse - scores[j])
    return sum(terms) / len(terms) if terms else 0.0


def _word_case():
    # One sentence, 2 valid words and one padded slot whose teacher vector would dominate
    # every softmax if it were not excluded.
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])
    valid = torch.tensor([[True, True, False]])
    return student, teacher, valid


def test_word_dot_by_hand():
    # logits = s_j . t_k over the valid columns: [[2, 0], [0, 1]]
    # loss_0 = -log(e^2 / (e^2 + 1)) = log(1 + e^-2) ~ 0.1269
    # loss_1 = -log(e^1 / (e^0 + e^1)) = log(1 + e^-1) ~ 0.3133
    student, teacher, valid = _word_case()
    all_words = torch.ones_like(valid)
    l0, l1 = math.log1p(math.exp(-2)), math.log1p(math.exp(-1))
    loss = word_infonce_loss(student, teacher, valid, all_words)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # only word 0 is a target -> loss_0 alone
    only0 = torch.tensor([[True, False, False]])
    assert word_infonce_loss(student, teacher, valid, only0).item() == pytest.approx(l0, rel=1e-6)


def test_word_tau_by_hand():
    # tau = 2 halves the logits: [[1, 0], [0, 0.5]] -> log(1+e^-1), log(1+e^-0.5)
    student, teacher, valid = _word_case()
    loss = word_infonce_loss(student, teacher, valid, torch.ones_like(valid), tau=2.0)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_word_cosine_by_hand_differs_from_dot():
    # cosine ignores |t_0| = 2: logits = I / tau. tau = 0.5 -> [[2, 0], [0, 2]]
    # -> both words log(1 + e^-2) ~ 0.1269 (dot at tau 0.5 would give log(1+e^-4), log(1+e^-2))
    student, teacher, valid = _word_case()
    all_words = torch.ones_like(valid)
    cos = word_infonce_loss(student, teacher, valid, all_words, sim="cosine", tau=0.5)
    dot = word_infonce_loss(student, teacher, valid, all_words, sim="dot", tau=0.5)
    assert cos.item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-6)
    assert dot.item() == pytest.approx((math.log1p(math.exp(-4)) + math.log1p(math.exp(-2))) / 2, rel=1e-6)


def test_word_invalid_columns_excluded():
    student, teacher, valid = _word_case()
    all_words = torch.ones_like(valid)
    base = word_infonce_loss(student, teacher, valid, all_words)
    # Changing anything in the padded slot (even to inf / nan) must not change the loss.
    student2, teacher2 = student.clone(), teacher.clone()
    student2[0, 2] = float("nan")
    teacher2[0, 2] = float("inf")
    assert word_infonce_loss(student2, teacher2, valid, all_words).item() == pytest.approx(base.item())
    # ... whereas treating it as valid does change it (the check above can fail).
    assert word_infonce_loss(student, teacher, torch.ones_like(valid), all_words).item() > base.item() + 1


@pytest.mark.parametrize("b,w,d", [(1, 1, 3), (2, 5, 4), (3, 7, 5), (4, 9, 2)])
@pytest.mark.parametrize("sim,tau", [("dot", 1.0), ("dot", 0.7), ("cosine", 0.1)])
def test_word_matches_loop(b, w, d, sim, tau):
    g = torch.Generator().manual_seed(b * 1000 + w * 10 + d)
    student = torch.randn(b, w, d, generator=g)
    teacher = torch.randn(b, w, d, generator=g)
    lengths = torch.randint(1, w + 1, (b,), generator=g)
    valid = torch.arange(w)[None, :] < lengths[:, None]
    target = torch.rand(b, w, generator=g) < 0.5
    target[:, 0] = True  # at least one scored word
    expected = _word_loop(student, teacher, valid, target, sim, tau)
    got = word_infonce_loss(student, teacher, valid, target, sim=sim, tau=tau, anchor="student", reduction="word")
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _authors_word_loss(student, teacher, valid, target):
    """The authors' compute_tacl_loss (mmkd/builder.py), as a loop over sentences, in float64.

    Per sentence: its words' teacher and student vectors in word order, scores = T @ S^T (the
    teacher word is the anchor, the softmax runs over the student's words), the diagonal's
    -log_softmax times the word labels, summed and divided by the number of labelled words;
    sentences with no labelled word are skipped, the rest averaged. (Their first-sentence
    `flag` bug, which overwrites the running sum when sentence 0 is skipped, is not copied.)
    """
    per_sentence = []
    for b in range(student.shape[0]):
        idx = valid[b].nonzero().flatten()
        labels = target[b, idx].double()
        if labels.sum() == 0:
            continue
        t_rep, s_rep = teacher[b, idx].double(), student[b, idx].double()
        logprobs = F.log_softmax(t_rep @ s_rep.T, dim=-1)
        gold = torch.arange(len(idx))
        loss = -logprobs.gather(dim=-1, index=gold.unsqueeze(1)).squeeze(1)
        per_sentence.append((loss * labels).sum() / labels.sum())
    return sum(per_sentence) / len(per_sentence)


def _authors_case(seed: int, b: int, w: int, d: int):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, w, d, generator=g) * 0.5
    teacher = torch.randn(b, w, d, generator=g) * 0.5
    lengths = torch.randint(2, w + 1, (b,), generator=g)
    valid = torch.arange(w)[None, :] < lengths[:, None]
    target = (torch.rand(b, w, generator=g) < 0.4) & valid
    target[0, 0] = True
    # a one-word sentence (scored), a sentence with no scored word, a hole inside a sentence
    valid[1], target[1] = False, False
    valid[1, 0] = target[1, 0] = True
    target[2] = False
    valid[3, 1] = False
    target[3, 0] = True
    return student, teacher, valid, target


@pytest.mark.parametrize("seed,b,w,d", [(0, 4, 6, 5), (1, 6, 9, 3), (2, 5, 12, 16)])
def test_word_defaults_equal_the_authors_loop(seed, b, w, d):
    student, teacher, valid, target = _authors_case(seed, b, w, d)
    s64 = student.double().requires_grad_(True)
    expected = _authors_word_loss(s64, teacher, valid, target)
    expected.backward()
    s32 = student.clone().requires_grad_(True)
    got = word_infonce_loss(s32, teacher, valid, target)  # default arguments
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # the unmasked words of a scored sentence get gradient as negatives; padding gets none
    unscored = valid[0] & ~target[0]
    assert s32.grad[0][unscored].abs().sum() > 0
    assert torch.all(s32.grad[~valid] == 0)
    # the sentence with no scored word gets none either, the one-word sentence counts as 0
    assert torch.all(s32.grad[2] == 0) and torch.all(s32.grad[1] == 0)
    # the sentence mean differs from one global mean over words when sentences differ in size
    per_word = word_infonce_loss(student, teacher, valid, target, reduction="word")
    assert abs(per_word.item() - got.item()) > 1e-4


def test_word_anchor_by_hand():
    # S = [[1, 0], [1, 1]], T = [[1, 0], [0, 1]]: s_j . t_k = [[1, 0], [1, 1]] (rows student).
    # anchor student (rows s_j):  -log softmax([1, 0])[0] = log(1 + e^-1); -log softmax([1, 1])[1] = log 2
    # anchor teacher (rows t_j = columns above): [1, 1] -> log 2; [0, 1] -> log(1 + e^-1)
    # Both average to the same here, so score word 0 only: they differ.
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    only0 = torch.tensor([[True, False]])
    assert word_infonce_loss(student, teacher, valid, only0, anchor="student").item() == pytest.approx(
        math.log1p(math.exp(-1)), rel=1e-6)
    assert word_infonce_loss(student, teacher, valid, only0, anchor="teacher").item() == pytest.approx(
        math.log(2), rel=1e-6)


def test_word_single_word_sentence_is_zero():
    student = torch.randn(1, 4, 3, requires_grad=True)
    teacher = torch.randn(1, 4, 3)
    valid = torch.tensor([[True, False, False, False]])
    loss = word_infonce_loss(student, teacher, valid, valid.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_word_no_targetassert_graph_zero():
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3)
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert_graph_zero(word_infonce_loss(student, teacher, valid, torch.zeros_like(valid)), student)
    student.grad = None
    # every word padding (e.g. an empty batch slot) -> also 0, no NaN
    none = torch.zeros_like(valid)
    assert_graph_zero(word_infonce_loss(student, teacher, none, torch.ones_like(valid)), student)


def test_word_all_padding_sentence_does_not_poison_batch():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 3, generator=g)
    valid = torch.tensor([[True, True, True, False], [False] * 4])
    loss = word_infonce_loss(student, teacher, valid, torch.ones_like(valid))
    alone = word_infonce_loss(student[:1], teacher[:1], valid[:1], valid[:1].clone())
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.all(student.grad[1] == 0) and student.grad[0].abs().sum() > 0


def test_word_gradients_student_only():
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    valid = torch.ones(2, 5, dtype=torch.bool)
    word_infonce_loss(student, teacher, valid, valid.clone()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("sim", ["dot", "cosine"])
def test_word_low_precision_is_fp32_and_close(dtype, sim):
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 6, 16, generator=g) * 0.3
    teacher = torch.randn(3, 6, 16, generator=g) * 0.3
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[2, 4:] = False
    ref = word_infonce_loss(student, teacher, valid, valid.clone(), sim=sim, tau=0.5)
    low = word_infonce_loss(student.to(dtype), teacher.to(dtype), valid, valid.clone(), sim=sim, tau=0.5)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=3e-2)


def test_word_rejects_bad_arguments():
    x = torch.randn(1, 2, 3)
    v = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="sim"):
        word_infonce_loss(x, x, v, v, sim="l2")
    with pytest.raises(ValueError, match="tau"):
        word_infonce_loss(x, x, v, v, tau=0.0)
    with pytest.raises(ValueError, match="anchor"):
        word_infonce_loss(x, x, v, v, anchor="both")
    with pytest.raises(ValueError, match="reduction"):
        word_infonce_loss(x, x, v, v, reduction="mean")
    with pytest.raises(ValueError, match=r"\[B, W\]"):
        word_infonce_loss(x, x, torch.ones(1, 3, dtype=torch.bool), v)


# --------------------------------------------------------------------------------------------
# sentence level


def test_byol_by_hand():
    # pair 0: (1,0) vs (0,2): cos 0 -> 2;  pair 1: (1,1) vs (2,2): cos 1 -> 0;  mean 1
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    zt = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert byol_loss(z, zt).item() == pytest.approx(1.0, abs=1e-6)
    # (3,4) vs (4,3): cos = 24/25 -> 2 - 48/25 = 0.08; a batch of one is fine
    one = byol_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]]))
    assert one.item() == pytest.approx(0.08, rel=1e-5)


@pytest.mark.parametrize("b,d", [(1, 3), (5, 7), (8, 128)])
def test_byol_matches_loop(b, d):
    g = torch.Generator().manual_seed(b + d)
    z, zt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    expected = sum(
        2 - 2 * float(z[i].double() @ zt[i].double() / (z[i].double().norm() * zt[i].double().norm()))
        for i in range(b)
    ) / b
    assert byol_loss(z, zt).item() == pytest.approx(expected, rel=1e-5)


def test_byol_gradients_student_only_and_zero_vector_safe():
    z = torch.randn(4, 8, requires_grad=True)
    zt = torch.randn(4, 8, requires_grad=True)
    byol_loss(z, zt).backward()
    assert z.grad.abs().sum() > 0 and zt.grad is None
    # A zero prediction: loss 2 for that row, finite everywhere.
    z0 = torch.zeros(2, 8, requires_grad=True)
    loss = byol_loss(z0, torch.randn(2, 8))
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.isfinite(z0.grad).all()


def test_byol_emptyassert_graph_zero():
    z = torch.empty(0, 8, requires_grad=True)
    assert_graph_zero(byol_loss(z, torch.empty(0, 8)), z)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_byol_low_precision(dtype):
    g = torch.Generator().manual_seed(9)
    z, zt = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    low = byol_loss(z.to(dtype), zt.to(dtype))
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(byol_loss(z, zt).item(), abs=2e-2)


def _heads(**kw):
    args = dict(student_hidden=12, teacher_hidden=10, mlp_hidden=16, out_dim=8, teacher_seed=7)
    args.update(kw)
    return SentenceHeads(**args)


def _layout(mlp: torch.nn.Module) -> list[tuple]:
    """(type, has bias / is affine) of each layer."""
    out = []
    for m in mlp.net:
        if isinstance(m, torch.nn.Linear):
            out.append(("Linear", m.bias is not None))
        elif isinstance(m, torch.nn.BatchNorm1d):
            out.append(("BatchNorm1d", m.affine))
        else:
            out.append((type(m).__name__,))
    return out


# The authors' _build_mlp(2, ...): Linear(bias=False) -> BN -> ReLU -> Linear(bias=False) [-> BN(affine=False)]
PROJECTOR = [("Linear", False), ("BatchNorm1d", True), ("ReLU",), ("Linear", False), ("BatchNorm1d", False)]
PREDICTOR = PROJECTOR[:-1]


def test_mlp_head_layers_as_the_authors():
    projector = MLPHead(5, 9, 4, final_bn=True)
    assert _layout(projector) == PROJECTOR
    assert _layout(MLPHead(4, 9, 4, final_bn=False)) == PREDICTOR
    assert _layout(MLPHead(5, 9, 4, final_bn=False, bias=True)) == [("Linear", True), ("BatchNorm1d", True),
                                                                     ("ReLU",), ("Linear", True)]
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = projector.train()(x)
    assert out.shape == (6, 4)
    # the last BatchNorm centres and scales each output over the batch: variance v / (v + eps) of the
    # pre-normalisation variance v (exactly 1 only when v >> eps, so compare with the formula)
    pre = projector.net[:-1](x)
    v = pre.var(0, unbiased=False)
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), v / (v + projector.net[-1].eps), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_heads_under_a_half_precision_engine(dtype, training):
    """A bf16/fp16 DeepSpeed engine converts parameters, not buffers: BatchNorm weights in half
    precision with fp32 running statistics, which torch's batch_norm alone refuses. The heads
    must train there, close to the fp32 heads, and keep fp32 running statistics."""
    torch.manual_seed(0)
    ref = SentenceHeads(12, 10, mlp_hidden=16, out_dim=8)
    half = SentenceHeads(12, 10, mlp_hidden=16, out_dim=8)
    half.load_state_dict(ref.state_dict())
    for p in half.parameters():  # what deepspeed.initialize does with bf16/fp16 enabled
        p.data = p.data.to(dtype)
    ref.train(training), half.train(training)
    s, t = torch.randn(6, 12), torch.randn(6, 10)
    z_ref, zt_ref = ref(s, t)
    z, zt = half(s.to(dtype), t.to(torch.float16))
    assert z.dtype == dtype and zt.dtype == dtype
    torch.testing.assert_close(z.float(), z_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(zt.float(), zt_ref, atol=0.05, rtol=0.05)
    z.float().pow(2).sum().backward()
    grads = [p.grad for p in half.g.parameters()]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    bn_ref, bn = ref.g.net[1], half.g.net[1]
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=0.02, rtol=0.02)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == int(training)


@pytest.mark.parametrize("make", [lambda: SentenceHeads(12, 10, mlp_hidden=16, out_dim=8),
                                  lambda: StructureHeads(12, 10, mlp_hidden=16, out_dim=8)])
def test_heads_are_projector_predictor_and_frozen_projector(make):
    heads = make().train()
    assert _layout(heads.g) == PROJECTOR and _layout(heads.g_T) == PROJECTOR and _layout(heads.q) == PREDICTOR
    assert heads.g.net[0].in_features == 12 and heads.g_T.net[0].in_features == 10
    assert heads.q.net[0].in_features == 8 and heads.q.net[3].out_features == 8
    s, t = torch.randn(6, 12), torch.randn(6, 10)
    z, zt = heads(s, t)
    # the student side is the predictor applied to the projector (batch statistics: deterministic)
    torch.testing.assert_close(z, heads.q(heads.g(s)))
    torch.testing.assert_close(zt, heads.g_T(t))


def test_sentence_heads_shapes_and_teacher_gets_no_grad():
    heads = _heads().train()
    s, t = torch.randn(6, 12), torch.randn(6, 10)
    z, zt = heads(s, t)
    assert z.shape == (6, 8) and zt.shape == (6, 8)
    assert not zt.requires_grad
    assert all(not p.requires_grad for p in heads.g_T.parameters())
    byol_loss(z, zt).backward()
    assert all(p.grad is None for p in heads.g_T.parameters())
    assert heads.g.net[0].weight.grad.abs().sum() > 0
    assert heads.q.net[3].weight.grad.abs().sum() > 0


def test_sentence_teacher_bn_stats_update_in_train_mode_only():
    heads = _heads().train()
    bn = heads.g_T.net[1]
    before = bn.running_mean.clone()
    heads(torch.randn(6, 12), torch.randn(6, 10) + 3)
    assert not torch.equal(bn.running_mean, before)
    heads.eval()
    after_train = bn.running_mean.clone()
    heads(torch.randn(6, 12), torch.randn(6, 10) + 3)
    assert torch.equal(bn.running_mean, after_train)


def test_sentence_teacher_init_ignores_global_seed():
    torch.manual_seed(1)
    a = _heads(teacher_seed=42)
    torch.manual_seed(2)
    b = _heads(teacher_seed=42)
    c = _heads(teacher_seed=43)
    for pa, pb in zip(a.g_T.parameters(), b.g_T.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not torch.equal(a.g_T.net[0].weight, c.g_T.net[0].weight)
    # the student heads do follow the global seed (they differ here)
    assert not torch.equal(a.g.net[0].weight, b.g.net[0].weight)
    # PyTorch's default Linear range: |w| <= 1/sqrt(fan_in)
    assert a.g_T.net[0].weight.abs().max() <= 1 / math.sqrt(10)


def test_sentence_and_structure_teacher_heads_independent_with_one_seed():
    sent = SentenceHeads(8, 8, mlp_hidden=16, out_dim=4, teacher_seed=0)
    struct = StructureHeads(8, 8, mlp_hidden=16, out_dim=4, teacher_seed=0)
    assert not torch.equal(sent.g_T.net[0].weight, struct.g_T.net[0].weight)


def test_sentence_ema_requires_equal_sizes():
    with pytest.raises(ValueError, match="student_hidden == teacher_hidden"):
        _heads(teacher_head="ema")
    with pytest.raises(ValueError, match="teacher_head"):
        _heads(teacher_head="momentum")


def test_sentence_ema_moves_teacher_toward_student():
    heads = _heads(teacher_hidden=12, teacher_head="ema", ema_decay=0.9)
    pairs = list(zip(heads.g_T.parameters(), heads.g.parameters()))
    old = [pt.clone() for pt, _ in pairs]
    heads.update_ema()
    for (pt, ps), o in zip(pairs, old):
        torch.testing.assert_close(pt, 0.9 * o + 0.1 * ps)
        assert not pt.requires_grad
    w_t, w_s = heads.g_T.net[0].weight, heads.g.net[0].weight
    dist = (w_t - w_s).norm()
    heads.update_ema()
    assert (w_t - w_s).norm() < dist


def test_sentence_frozen_update_ema_is_noop():
    heads = _heads()
    before = heads.g_T.net[0].weight.clone()
    heads.update_ema()
    assert torch.equal(heads.g_T.net[0].weight, before)


# --------------------------------------------------------------------------------------------
# structure level


def _structure_loop(s, t, tau=1.0, s_cols=None, t_cols=None):
    s_cols = s if s_cols is None else s_cols
    t_cols = t if t_cols is None else t_cols

    def softmax_row(x, cols, i):
        xi = x[i].double() / x[i].double().norm()
        scores = [float(xi @ (c.double() / c.double().norm())) / tau for c in cols]
        mx = max(scores)
        z = sum(math.exp(a - mx) for a in scores)
        return [math.exp(a - mx) / z for a in scores]

    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = softmax_row(s, s_cols, i), softmax_row(t, t_cols, i)
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    return total / s.shape[0]


def test_structure_by_hand_square():
    # student rows e1, e2 -> A_S = I -> p_S[0] = [e/(e+1), 1/(e+1)]
    # teacher rows e1, e1 -> A_T = all ones -> p_T = [1/2, 1/2]
    # KL row 0 = sum_j 1/2 (ln 1/2 - ln p_S[0, j]) = ln(1+e) - 1/2 - ln 2 ~ 0.1201; row 1 alike
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = math.log1p(math.e) - 0.5 - math.log(2)
    assert structure_kl_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # scaling the vectors changes nothing (normalised)
    assert structure_kl_loss(3 * s, 0.5 * t).item() == pytest.approx(expected, rel=1e-5)


def test_structure_by_hand_rows_ne_cols():
    # 1 row against 3 columns. A_S = [1, 0, -1]; teacher columns all equal -> p_T = 1/3 each.
    # KL = sum_j 1/3 (ln 1/3 - a_j + lse(a)) = lse(1, 0, -1) - ln 3 - mean(a) (= 0) ~ 0.3090
    s = torch.tensor([[1.0, 0.0]])
    s_cols = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    t_cols = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    expected = math.log(math.e + 1 + math.exp(-1)) - math.log(3)
    got = structure_kl_loss(s, t, student_cols=s_cols, teacher_cols=t_cols)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # tau = 2: A_S = [1/2, 0, -1/2], p_T still uniform -> lse(1/2, 0, -1/2) - ln 3
    got2 = structure_kl_loss(s, t, tau=2.0, student_cols=s_cols, teacher_cols=t_cols)
    assert got2.item() == pytest.approx(math.log(math.exp(0.5) + 1 + math.exp(-0.5)) - math.log(3), rel=1e-5)


@pytest.mark.parametrize("n,m,d", [(2, None, 3), (5, None, 8), (3, 7, 4), (6, 4, 5), (9, None, 16)])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_structure_matches_loop(n, m, d, tau):
    g = torch.Generator().manual_seed(n * 100 + (m or 0) * 10 + d)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    kw = {}
    if m is not None:
        kw = dict(student_cols=torch.randn(m, d, generator=g), teacher_cols=torch.randn(m, d, generator=g))
    expected = _structure_loop(s, t, tau, kw.get("student_cols"), kw.get("teacher_cols"))
    got = structure_kl_loss(s, t, tau=tau, **kw)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_structure_matches_torch_kl_div():
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    log_ps = (F.normalize(s) @ F.normalize(s).T / 0.5).log_softmax(-1)
    log_pt = (F.normalize(t) @ F.normalize(t).T / 0.5).log_softmax(-1)
    ref = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
    torch.testing.assert_close(structure_kl_loss(s, t, tau=0.5), ref)


def test_structure_batch_of_one_is_zero_and_backward_works():
    s = torch.randn(1, 4, requires_grad=True)
    loss = structure_kl_loss(s, torch.randn(1, 4))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_structure_emptyassert_graph_zero():
    s = torch.empty(0, 4, requires_grad=True)
    assert_graph_zero(structure_kl_loss(s, torch.empty(0, 4)), s)


def test_structure_identical_geometry_is_zero():
    # Same directions on both sides (different norms) -> same softmaxes -> KL 0
    s = torch.randn(5, 3)
    assert structure_kl_loss(s, 2.5 * s).item() == pytest.approx(0.0, abs=1e-6)


def test_structure_gradients_student_only_incl_cols():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    s_cols = torch.randn(5, 4, requires_grad=True)
    t_cols = torch.randn(5, 4, requires_grad=True)
    structure_kl_loss(s, t, student_cols=s_cols, teacher_cols=t_cols).backward()
    assert s.grad.abs().sum() > 0 and s_cols.grad.abs().sum() > 0
    assert t.grad is None and t_cols.grad is None


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_structure_low_precision(dtype):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    low = structure_kl_loss(s.to(dtype), t.to(dtype), tau=0.5)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(structure_kl_loss(s, t, tau=0.5).item(), rel=3e-2)


def test_structure_rejects_half_given_cols():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="both"):
        structure_kl_loss(x, x, student_cols=x)
    with pytest.raises(ValueError, match="tau"):
        structure_kl_loss(x, x, tau=-1.0)


def test_structure_heads():
    heads = StructureHeads(12, 10, mlp_hidden=16, out_dim=8, teacher_seed=3).train()
    bn = heads.g_T.net[1]
    before = bn.running_mean.clone()
    u, v = heads(torch.randn(5, 12), torch.randn(5, 10) + 2)
    assert u.shape == (5, 8) and v.shape == (5, 8) and not v.requires_grad
    assert not torch.equal(bn.running_mean, before)
    structure_kl_loss(u, v).backward()
    assert all(not p.requires_grad and p.grad is None for p in heads.g_T.parameters())
    assert heads.g.net[0].weight.grad.abs().sum() > 0 and heads.q.net[0].weight.grad.abs().sum() > 0
    torch.manual_seed(123)
    again = StructureHeads(12, 10, mlp_hidden=16, out_dim=8, teacher_seed=3)
    torch.testing.assert_close(again.g_T.net[0].weight, heads.g_T.net[0].weight)


def test_heads_accept_half_teacher_inputs():
    # Teacher [CLS] vectors come from shards in fp16 while the heads are fp32.
    heads = _heads().train()
    z, zt = heads(torch.randn(4, 12), torch.randn(4, 10).half())
    assert zt.dtype == torch.float32 and torch.isfinite(zt).all()

"""Triton structure-KL kernel (run on CPU through the Triton interpreter) against references.

conftest.py sets TRITON_INTERPRET=1 before triton is imported, so ``backend="triton"`` runs the
real kernels here. Two references: the module's vectorised ``structure_kl_reference`` and a
naive formula written below with materialised matrices and torch.softmax / log_softmax.
Shapes stay small (N, M <= 40, D <= 48): the interpreter is slow.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also when this file is run on its own

import pytest
import torch

from mmkd_ds.kernels.structure_kl import structure_kl, structure_kl_reference

# The package re-exports the function under the module's own name, so ``import
# mmkd_ds.kernels.structure_kl as skl`` would bind the function: fetch the module itself.
skl = importlib.import_module("mmkd_ds.kernels.structure_kl")

pytestmark = pytest.mark.skipif(not skl._HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A developer's MMKD_KERNELS must not change what these tests exercise.
    monkeypatch.delenv("MMKD_KERNELS", raising=False)


def naive_structure_kl(student, teacher, tau=1.0, student_cols=None, teacher_cols=None, eps=1e-12):
    """(1/N) sum_i KL(softmax(A_T[i]) || softmax(A_S[i])) with everything materialised."""
    if student_cols is None:
        student_cols, teacher_cols = student, teacher

    def unit(x):
        x = x.float()
        return x / x.norm(dim=1, keepdim=True).clamp_min(eps)

    a_s = unit(student) @ unit(student_cols).T / tau
    a_t = unit(teacher.detach()) @ unit(teacher_cols.detach()).T / tau
    p_t = torch.softmax(a_t, dim=1)
    kl = (p_t * (torch.log_softmax(a_t, dim=1) - torch.log_softmax(a_s, dim=1))).sum(dim=1)
    return kl.mean()


def _inputs(n, m, d_s, d_t, separate, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d_s, generator=g).to(dtype).requires_grad_()
    t = torch.randn(n, d_t, generator=g).to(dtype)
    if not separate:
        return s, t, None, None
    sc = torch.randn(m, d_s, generator=g).to(dtype).requires_grad_()
    tc = torch.randn(m, d_t, generator=g).to(dtype)
    return s, t, sc, tc


def _value_and_grads(fn, s, t, sc, tc, tau, upstream=1.0, **kw):
    """Loss value and gradients (student, student_cols) of ``upstream * fn(...)`` on fresh leaves."""
    s = s.detach().clone().requires_grad_()
    sc = None if sc is None else sc.detach().clone().requires_grad_()
    loss = fn(s, t, tau, student_cols=sc, teacher_cols=tc, **kw)
    (loss * upstream).backward()
    return loss.detach(), s.grad, (None if sc is None else sc.grad)


def _naive(s, t, tau, student_cols=None, teacher_cols=None):
    return naive_structure_kl(s, t, tau, student_cols, teacher_cols)


def _assert_close_scaled(actual, expected, rtol, what):
    """Elementwise closeness relative to the tensor's own scale (gradients can be tiny)."""
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale, msg=what)


# (N, M, D_S, D_T, separate cols, tau, block_n, block_m)
CASES = [
    pytest.param(1, 1, 8, 8, False, 1.0, None, None, id="N1-self"),
    pytest.param(1, 9, 20, 20, True, 0.5, 1, 4, id="N1-vs-9cols"),
    pytest.param(7, 7, 20, 20, False, 1.0, 4, 4, id="N7-D20"),
    pytest.param(13, 13, 33, 20, False, 0.1, 4, 8, id="N13-D33-tau0.1"),
    pytest.param(5, 11, 20, 33, True, 0.5, 2, 4, id="rows5-cols11"),
    pytest.param(13, 37, 48, 24, True, 0.1, 8, 16, id="rows13-cols37"),
    pytest.param(40, 40, 48, 48, False, 0.5, 16, 16, id="N40-D48"),
]


@pytest.mark.parametrize("n,m,d_s,d_t,separate,tau,block_n,block_m", CASES)
def test_matches_references(n, m, d_s, d_t, separate, tau, block_n, block_m):
    s, t, sc, tc = _inputs(n, m, d_s, d_t, separate, seed=n * 100 + m)
    got = _value_and_grads(
        structure_kl, s, t, sc, tc, tau, upstream=3.7, backend="triton", block_n=block_n, block_m=block_m
    )
    ref = _value_and_grads(structure_kl_reference, s, t, sc, tc, tau, upstream=3.7)
    naive = _value_and_grads(_naive, s, t, sc, tc, tau, upstream=3.7)
    for expected, name in ((ref, "reference"), (naive, "naive")):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6, msg=f"loss vs {name}")
        _assert_close_scaled(got[1], expected[1], 1e-4, f"d student vs {name}")
        if separate:
            _assert_close_scaled(got[2], expected[2], 1e-4, f"d student_cols vs {name}")
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    if n == 1 and not separate:
        # Softmax over a single column: both distributions are [1], the KL and its gradient 0.
        assert got[0].item() == 0.0 and torch.count_nonzero(got[1]) == 0
    else:
        assert got[0].item() > 0 and got[1].abs().max() > 0  # the comparison was not trivial


def test_block_sizes_do_not_change_the_result():
    """Several column tiles (online-softmax rescaling) vs one tile covering everything."""
    s, t, sc, tc = _inputs(13, 37, 20, 20, True, seed=3)
    one_tile = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, backend="triton", block_n=16, block_m=64)
    many = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, backend="triton", block_n=2, block_m=4)
    torch.testing.assert_close(many[0], one_tile[0], rtol=1e-5, atol=1e-6)
    _assert_close_scaled(many[1], one_tile[1], 1e-4, "d student")
    _assert_close_scaled(many[2], one_tile[2], 1e-4, "d student_cols")


def test_online_softmax_when_the_max_comes_late():
    """Each row's best column sits in the last tile and tau is small (logits up to 50).

    A kernel that fixed the softmax shift from the first tile would over/underflow here.
    """
    g = torch.Generator().manual_seed(5)
    n, m, d = 6, 29, 16
    s = torch.randn(n, d, generator=g)
    t = torch.randn(n, d, generator=g)
    sc = torch.cat([-s.repeat(4, 1)[: m - n] + 0.1 * torch.randn(m - n, d, generator=g), s])  # rows last
    tc = torch.cat([-t.repeat(4, 1)[: m - n], t + 0.05 * torch.randn(n, d, generator=g)])
    got = _value_and_grads(structure_kl, s, t, sc, tc, 0.02, backend="triton", block_n=4, block_m=8)
    ref = _value_and_grads(naive_structure_kl, s, t, sc, tc, 0.02)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    _assert_close_scaled(got[1], ref[1], 1e-3, "d student")
    _assert_close_scaled(got[2], ref[2], 1e-3, "d student_cols")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("separate", [False, True], ids=["self", "cols"])
def test_half_inputs_accumulate_in_fp32(dtype, separate):
    s, t, sc, tc = _inputs(13, 21, 33, 20, separate, dtype=dtype, seed=7)
    loss, ds, dsc = _value_and_grads(structure_kl, s, t, sc, tc, 0.5, backend="triton", block_n=4, block_m=8)
    # The fp32 reference of the very same rounded inputs.
    up = lambda x: None if x is None else x.detach().float()  # noqa: E731
    ref = _value_and_grads(structure_kl_reference, up(s), up(t), up(sc), up(tc), 0.5)
    assert loss.dtype == torch.float32
    assert ds.dtype == dtype and (dsc is None or dsc.dtype == dtype)
    # The loss is computed in fp32 from the rounded inputs: tight even for half types.
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
    # The gradient is computed in fp32 and rounded once to the input dtype.
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}[dtype]
    _assert_close_scaled(ds, ref[1], rtol, "d student")
    if separate:
        _assert_close_scaled(dsc, ref[2], rtol, "d student_cols")


def test_teacher_gets_no_gradient():
    s, t, sc, tc = _inputs(7, 9, 20, 20, True, seed=11)
    t.requires_grad_()
    tc.requires_grad_()
    loss = structure_kl(s, t, 0.5, student_cols=sc, teacher_cols=tc, backend="triton", block_n=4, block_m=4)
    loss.backward()
    assert t.grad is None and tc.grad is None
    assert s.grad is not None and sc.grad is not None and s.grad.abs().max() > 0


def test_only_student_cols_need_grad():
    """Rows frozen, columns trainable: only the column kernel's gradient is returned."""
    s, t, sc, tc = _inputs(5, 11, 20, 20, True, seed=12)
    s = s.detach()
    loss = structure_kl(s, t, 0.5, student_cols=sc, teacher_cols=tc, backend="triton", block_n=4, block_m=4)
    loss.backward()
    ref = _value_and_grads(structure_kl_reference, s, t, sc, tc, 0.5)
    _assert_close_scaled(sc.grad, ref[2], 1e-4, "d student_cols")


def test_cols_equal_rows_accumulates_into_one_tensor():
    s, t, _, _ = _inputs(13, 13, 20, 20, False, seed=13)
    implicit = _value_and_grads(structure_kl, s, t, None, None, 0.5, backend="triton", block_n=4, block_m=8)

    # Same tensors passed explicitly as columns: autograd sums both gradients into s.grad.
    s2 = s.detach().clone().requires_grad_()
    explicit = structure_kl(s2, t, 0.5, student_cols=s2, teacher_cols=t, backend="triton", block_n=4, block_m=8)
    explicit.backward()
    torch.testing.assert_close(explicit.detach(), implicit[0], rtol=1e-6, atol=1e-7)
    _assert_close_scaled(s2.grad, implicit[1], 1e-5, "explicit vs implicit cols")

    # Two separate leaves with the same values: their gradients add up to the shared one, and
    # neither half alone is the whole (both contributions are non-zero).
    r, c = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    structure_kl(r, t, 0.5, student_cols=c, teacher_cols=t, backend="triton", block_n=4, block_m=8).backward()
    _assert_close_scaled(r.grad + c.grad, implicit[1], 1e-5, "rows + cols")
    assert (r.grad - implicit[1]).abs().max() > 1e-3 * implicit[1].abs().max()
    assert (c.grad - implicit[1]).abs().max() > 1e-3 * implicit[1].abs().max()


def test_zero_row_and_non_contiguous_input():
    """Rows with norm 0 and below eps (normalisation clamp active) and a strided view as input."""
    g = torch.Generator().manual_seed(17)
    base = torch.randn(7, 40, generator=g)
    base[3] = 0.0
    base[5] *= 1e-14  # |x| < eps = 1e-12: x_hat = x / eps is not unit, the clamp's branch
    s_view = base[:, ::2]  # [7, 20], not contiguous
    assert not s_view.is_contiguous()
    t = torch.randn(7, 20, generator=g)
    got = _value_and_grads(structure_kl, s_view, t, None, None, 0.5, backend="triton", block_n=4, block_m=4)
    ref = _value_and_grads(naive_structure_kl, s_view, t, None, None, 0.5)
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    _assert_close_scaled(got[1], ref[1], 1e-4, "d student")
    assert got[1][3].abs().max() > 0 and got[1][5].abs().max() > 0  # through the eps branch


def test_matches_project_loss():
    """Same value and gradient as mmkd_ds.losses.structure_kl_loss (eps 1e-8 there)."""
    from mmkd_ds.losses.structure import structure_kl_loss

    s, t, sc, tc = _inputs(5, 11, 20, 24, True, seed=19)
    got = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, backend="triton", eps=1e-8, block_n=4, block_m=4)
    ref = _value_and_grads(
        lambda a, b, tau, student_cols, teacher_cols: structure_kl_loss(a, b, tau, student_cols, teacher_cols),
        s, t, sc, tc, 0.1,
    )  # fmt: skip
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    _assert_close_scaled(got[1], ref[1], 1e-4, "d student")
    _assert_close_scaled(got[2], ref[2], 1e-4, "d student_cols")


def _saved_shapes(fn):
    """Shapes of every tensor autograd saves for the backward while ``fn()`` runs the forward."""
    shapes = []

    def pack(x):
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn()
    loss.backward()  # the saved tensors are really enough for the backward
    return shapes


@pytest.mark.parametrize("separate", [False, True], ids=["self", "cols"])
def test_saved_for_backward_is_linear_in_n(separate):
    n, m, d = 24, (40 if separate else 24), 6
    s, t, sc, tc = _inputs(n, m, d, d, separate, seed=23)
    m_eff = m if separate else n
    kw = dict(student_cols=sc, teacher_cols=tc)
    shapes = _saved_shapes(lambda: structure_kl(s, t, 0.5, backend="triton", block_n=8, block_m=8, **kw))
    assert shapes, "nothing saved?"
    for shape in shapes:
        numel = int(torch.tensor(shape).prod().item()) if shape else 1
        assert numel <= max(n, m_eff) * d, f"saved {shape}: more than O((N + M) * D)"
        assert shape not in ((n, m_eff), (m_eff, n))
    # The check does catch an N x M tensor: the materialised reference saves one.
    ref_shapes = _saved_shapes(lambda: structure_kl(s, t, 0.5, backend="torch", **kw))
    assert (n, m_eff) in ref_shapes


def test_empty_inputs_give_connected_zero():
    s = torch.zeros(0, 8, requires_grad=True)
    loss = structure_kl(s, torch.zeros(0, 8), backend="triton")
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.shape == (0, 8)


# ------------------------------------------------------------------------------------ dispatch


def test_auto_on_cpu_takes_the_torch_path(monkeypatch):
    assert skl._resolve_backend("auto", torch.device("cpu")) == "torch"
    assert skl._resolve_backend("auto", torch.device("cuda")) == "triton"

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU under backend='auto'")

    monkeypatch.setattr(skl.StructureKLFunction, "apply", boom)
    s, t, _, _ = _inputs(5, 5, 8, 8, False)
    loss = structure_kl(s, t, 0.5)  # would raise through boom if it dispatched to Triton
    torch.testing.assert_close(loss, structure_kl_reference(s, t, 0.5))
    assert loss.grad_fn is not None and "StructureKL" not in type(loss.grad_fn).__name__
    with pytest.raises(AssertionError, match="Triton path"):
        structure_kl(s, t, 0.5, backend="triton")


def test_triton_backend_uses_the_autograd_function():
    s, t, _, _ = _inputs(5, 5, 8, 8, False)
    loss = structure_kl(s, t, 0.5, backend="triton")
    assert "StructureKLFunction" in type(loss.grad_fn).__name__


def test_env_var_sets_the_default(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MMKD_KERNELS", "triton")
    assert skl._resolve_backend("auto", cpu) == "triton"
    s, t, _, _ = _inputs(5, 5, 8, 8, False)
    assert "StructureKLFunction" in type(structure_kl(s, t).grad_fn).__name__
    assert skl._resolve_backend("torch", cpu) == "torch"  # an explicit backend wins
    monkeypatch.setenv("MMKD_KERNELS", "torch")
    assert skl._resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("MMKD_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MMKD_KERNELS"):
        structure_kl(s, t)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(skl, "_interpreter_active", lambda: False)
    s, t, _, _ = _inputs(5, 5, 8, 8, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        structure_kl(s, t, backend="triton")
    assert structure_kl(s, t, backend="torch").item() > 0  # the torch path is unaffected


def test_bad_arguments():
    s, t, sc, tc = _inputs(5, 7, 8, 8, True)
    with pytest.raises(ValueError, match="backend"):
        structure_kl(s, t, backend="cuda")
    with pytest.raises(ValueError, match="both"):
        structure_kl(s, t, student_cols=sc, backend="triton")
    with pytest.raises(ValueError, match="tau"):
        structure_kl(s, t, 0.0, backend="triton")
    with pytest.raises(ValueError, match="same N"):
        structure_kl(s, t[:4], backend="triton")
    with pytest.raises(ValueError, match="student_cols"):
        structure_kl(s, t, student_cols=sc[:, :4], teacher_cols=tc, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        structure_kl(s, t, backend="triton", block_n=6)


# ------------------------------------------------------------------------ wide and odd heads


@pytest.mark.parametrize(
    "n,m,d_s,d_t,separate",
    [
        pytest.param(5, 5, 1000, 1000, False, id="D1000-self"),  # chunks of 256, last one masked
        pytest.param(3, 6, 2100, 77, True, id="D2100-vs-77-cols"),  # wide student, odd narrow teacher
    ],
)
def test_wide_and_odd_heads(n, m, d_s, d_t, separate):
    """Whole rows no longer sit in one program: D is walked in chunks (logits) and the backward
    output in chunks of features, so any D works; the result matches the references."""
    s, t, sc, tc = _inputs(n, m, d_s, d_t, separate, seed=d_s)
    cfg = skl._launch_config(n, m, d_s, None, None, None)
    assert d_s > 2 * cfg["BLOCK_K"] and d_s > 2 * cfg["BLOCK_DO"]  # several chunks on both axes
    assert d_s % cfg["BLOCK_K"] and d_s % cfg["BLOCK_DO"]  # and a masked last one
    got = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, upstream=0.3, backend="triton")
    ref = _value_and_grads(_naive, s, t, sc, tc, 0.1, upstream=0.3)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    _assert_close_scaled(got[1], ref[1], 1e-4, "d student")
    if separate:
        _assert_close_scaled(got[2], ref[2], 1e-4, "d student_cols")
    assert got[0].item() > 0


# ------------------------------------------------------------------------------- precision


def _clustered(n, d, seed):
    """Sentence-embedding-like rows: 6 clusters, so cosines span about -0.3 ... 0.95 and the
    softmax at tau = 0.05 is far from uniform. The student is a noisier copy of the teacher."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g, dtype=torch.float64)
    idx = torch.arange(n) % 6
    teacher = centres[idx] + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    student = centres[idx] + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return student, teacher


def _fp64_formula(student, teacher, tau):
    """Loss and d loss / d student in float64 (the formula, materialised)."""
    s = student.detach().double().requires_grad_()
    u = s / s.norm(dim=1, keepdim=True)
    v = teacher.double() / teacher.double().norm(dim=1, keepdim=True)
    log_p_s = (u @ u.T / tau).log_softmax(dim=1)
    log_p_t = (v @ v.T / tau).log_softmax(dim=1)
    loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    loss.backward()
    return loss.detach(), s.grad


def precision_errors(n=64, d=96, taus=(0.05, 0.1), seed=0):
    """{(precision, tau): (relative loss error, max gradient error / max |gradient|)} vs fp64.

    Under the interpreter the kernel rounds the dot inputs itself (tf32: 10 mantissa bits,
    bf16: 7, round to nearest) because the interpreter's dot ignores ``input_precision``.
    """
    student, teacher = _clustered(n, d, seed)
    out = {}
    for tau in taus:
        ref_loss, ref_grad = _fp64_formula(student, teacher, tau)
        for precision in skl.PRECISIONS:
            s = student.float().requires_grad_()
            loss = structure_kl(s, teacher.float(), tau, backend="triton", precision=precision)
            loss.backward()
            out[precision, tau] = (
                abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                ((s.grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item(),
            )
    return out


def test_precision_accuracy_against_fp64():
    """The table of the module docstring: each precision's error against the fp64 formula.

    Bounds: IEEE is fp32 arithmetic (~1e-6); tf32 inputs carry 2^-11 relative rounding and
    bf16 2^-8, amplified by the logits' scale 1/tau and by the cancellation in p_S - p_T.
    """
    errs = precision_errors()
    for (precision, tau), (loss_err, grad_err) in sorted(errs.items()):
        print(f"{precision:5s} tau={tau:<5} loss rel err {loss_err:.1e}  grad rel err {grad_err:.1e}")
    bounds = {"ieee": (1e-5, 2e-5), "tf32": (1e-3, 5e-3), "bf16": (1e-2, 5e-2)}
    for (precision, tau), (loss_err, grad_err) in errs.items():
        assert loss_err < bounds[precision][0], (precision, tau, loss_err)
        assert grad_err < bounds[precision][1], (precision, tau, grad_err)
    for tau in (0.05, 0.1):  # and the rounding really happened: the ordering of the table
        assert errs["ieee", tau][1] < errs["tf32", tau][1] < errs["bf16", tau][1]


def test_default_precision_and_bad_precision():
    s, t, _, _ = _inputs(9, 9, 20, 20, False, seed=29)
    assert skl.DEFAULT_PRECISION == "ieee"
    default = structure_kl(s, t, 0.1, backend="triton")
    ieee = structure_kl(s, t, 0.1, backend="triton", precision="ieee")
    assert default.item() == ieee.item()
    with pytest.raises(ValueError, match="precision"):
        structure_kl(s, t, backend="triton", precision="fp8")


def test_padded_rows_give_the_same_result(monkeypatch):
    """On GPU the normalised rows are zero-padded to 16 elements (aligned loads for odd D):
    force that padding here and check that value and gradients do not move."""
    s, t, sc, tc = _inputs(7, 11, 33, 20, True, seed=31)
    plain = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, backend="triton", block_n=4, block_m=8)
    monkeypatch.setattr(skl, "_INTERP_ROW_ALIGN", 16)
    s_hat, _ = skl._normalize(s, skl.EPS, skl._row_align(None))
    assert s_hat.shape == (7, 33) and s_hat.stride(0) == 48  # really padded
    padded = _value_and_grads(structure_kl, s, t, sc, tc, 0.1, backend="triton", block_n=4, block_m=8)
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-6, atol=1e-7)
    assert padded[1].shape == s.shape and padded[2].shape == sc.shape
    _assert_close_scaled(padded[1], plain[1], 1e-5, "d student")
    _assert_close_scaled(padded[2], plain[2], 1e-5, "d student_cols")

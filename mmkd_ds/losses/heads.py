"""The MLP heads of the sentence and structure levels, built as the authors' ``_build_mlp``.

Two layers, every Linear without bias by default:

    projector  Linear(in, m) -> BatchNorm1d(m) -> ReLU -> Linear(m, out) -> BatchNorm1d(out, affine=False)
    predictor  Linear(out, m) -> BatchNorm1d(m) -> ReLU -> Linear(m, out)

The projector's last BatchNorm (no affine) centres and whitens its output over the batch. On the
frozen teacher-side projector that matters most: without it the targets of a random projection of
real [CLS] vectors share much of their direction (mean pairwise cosine 0.32 on the demo teacher),
so a constant prediction already removes most of the BYOL loss and the structure-level target
similarities are nearly flat. ``head_bias=True, final_bn=False`` gives the project's earlier
heads, kept for comparison.

BatchNorm1d in training mode needs at least two rows (torch raises on a batch of one).

Under a bf16 or fp16 DeepSpeed engine the parameters become bf16/fp16 but buffers stay fp32,
and torch's batch_norm refuses half-precision weights with fp32 running statistics: the
BatchNorm layers here (:class:`FP32BatchNorm1d`) normalise in fp32 and return the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FP32BatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` computed in fp32 when the input or the parameters are fp16/bf16.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d``. The running statistics
    stay fp32 buffers (DeepSpeed converts parameters, not buffers, to bf16/fp16), and the batch
    statistics of a half-precision batch are computed in fp32. ``[B, C] -> [B, C]``, input dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        half = (torch.float16, torch.bfloat16)
        if x.dtype not in half and (self.weight is None or self.weight.dtype not in half):
            return super().forward(x)  # fp32 (or fp64, as the reference tests run it): torch's own
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        out = nn.functional.batch_norm(
            x.float(),
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            use_batch_stats, momentum, self.eps,
        )
        return out.to(x.dtype)


class MLPHead(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Linear [-> BatchNorm1d(affine=False)]``: ``[B, in] -> [B, out]``.

    Args:
        in_dim, hidden_dim, out_dim: widths of the input, the hidden layer (m) and the output.
        final_bn: end in ``BatchNorm1d(out_dim, affine=False)`` (a projector) or not (a predictor).
        bias: give the Linear layers a bias (the authors' heads have none).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, final_bn: bool, bias: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim, bias=bias),
            FP32BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=bias),
        ]
        if final_bn:
            layers.append(FP32BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # Follow the weights' dtype: teacher [CLS] vectors come from shards in fp16 while the heads
        # may be fp32, or the reverse under a bf16 engine.
        return self.net(x.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def reset_parameters_seeded(self, seed: int) -> None:
        """Re-initialise from a local generator: independent of the global RNG state.

        Linear weights (and biases) get PyTorch's default distribution, uniform +-1/sqrt(fan_in);
        BatchNorm goes back to weight 1, bias 0 and fresh statistics. Values are drawn on the CPU
        and copied, so the result does not depend on the device.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()


def frozen_projector(in_dim: int, hidden_dim: int, out_dim: int, seed: int, salt: int, *,
                     final_bn: bool = True, bias: bool = False) -> MLPHead:
    """A projector at a seeded initialisation with every parameter's ``requires_grad`` False.

    Its BatchNorm layers still normalise with batch statistics and update their running
    statistics in training mode, as the authors' teacher projector does (it gets no gradient
    but is not put in eval mode).
    """
    head = MLPHead(in_dim, hidden_dim, out_dim, final_bn=final_bn, bias=bias)
    # Mix seed and salt into one 63-bit value: same (seed, salt) -> same weights.
    head.reset_parameters_seeded((seed * 0x9E3779B97F4A7C15 + salt) % (1 << 63))
    head.requires_grad_(False)
    return head


class BYOLHeads(nn.Module):
    """One level's heads: projector g and predictor q (trained), teacher projector g_T (frozen).

    ``forward(student_cls [B, H_S], teacher_cls [B, H_T]) -> (q(g(student_cls)) [B, out],
    g_T(teacher_cls) [B, out])``; the second carries no graph. The sentence level and the
    structure level each own one of these (different ``salt``, so their teacher projectors
    differ even with one seed), as the authors' ``base_projector``/``predictor``/
    ``momentum_projector`` and ``base_projector2``/``predictor2``/``momentum_projector2``.

    Args:
        student_hidden: H_S, size of the student's [CLS] vector.
        teacher_hidden: H_T, size of the teacher's [CLS] vector.
        mlp_hidden: m, hidden width of the three MLPs (the authors' ``--mmkd-mlp-dim``, 768).
        out_dim: output width (the authors' ``--mmkd-dim``, 128).
        teacher_seed: seed of g_T's initialisation (local generator), mixed with the class's
            ``salt`` (or the ``salt`` argument).
        final_bn: projectors end in ``BatchNorm1d(affine=False)`` (the authors' heads).
        bias: Linear layers with bias (the authors' have none).
    """

    salt: int = 0

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        mlp_hidden: int = 768,
        out_dim: int = 128,
        teacher_seed: int = 0,
        final_bn: bool = True,
        bias: bool = False,
        salt: int | None = None,
    ) -> None:
        super().__init__()
        salt = self.salt if salt is None else salt
        self.g = MLPHead(student_hidden, mlp_hidden, out_dim, final_bn=final_bn, bias=bias)
        self.q = MLPHead(out_dim, mlp_hidden, out_dim, final_bn=False, bias=bias)
        self.g_T = frozen_projector(teacher_hidden, mlp_hidden, out_dim, teacher_seed, salt,
                                    final_bn=final_bn, bias=bias)

    def forward(self, student_cls: Tensor, teacher_cls: Tensor) -> tuple[Tensor, Tensor]:
        z = self.q(self.g(student_cls))
        with torch.no_grad():
            z_teacher = self.g_T(teacher_cls)
        return z, z_teacher

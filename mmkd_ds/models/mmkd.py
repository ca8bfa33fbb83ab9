"""The trained module: the student masked-LM plus the MMKD heads, computing all four losses.

One encoder pass per step over the stacked row groups of ``training.batch`` (tlm, word,
sent), optionally split into buckets of similar length (``student.length_buckets``); the MLM head runs only on the selected positions (never a [rows, L, vocab] logits tensor);
the student's sentence vector of the translation ([CLS] or token mean, loss.sentence_pooling)
feeds both the sentence and the structure levels.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from mmkd_ds.config.schema import LossConfig
from mmkd_ds.kernels.word_pool import word_pool
from mmkd_ds.losses import SentenceHeads, StructureHeads, byol_loss, structure_kl_loss, tlm_loss, word_infonce_loss
from mmkd_ds.sentence_pooling import sentence_vectors

OBJECTIVES = ("token", "word", "sentence", "structure")


def mlm_head(student: nn.Module) -> nn.Module:
    """The module mapping hidden states [*, H] to vocabulary logits [*, V]."""
    for name in ("cls", "lm_head"):  # BERT-style; RoBERTa/XLM-R-style
        if hasattr(student, name):
            return getattr(student, name)
    raise ValueError(
        f"{type(student).__name__}: no MLM head found (expected an attribute `cls` or `lm_head`); "
        "use a BERT- or RoBERTa-style masked-LM student"
    )


def gather_columns(x: Tensor, with_grad: bool) -> Tensor:
    """All ranks' rows of ``x`` concatenated in rank order (this rank's keep their gradient)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def encode_in_buckets(encoder: nn.Module, inputs: dict[str, Tensor], buckets: int) -> Tensor:
    """``encoder(**inputs).last_hidden_state`` [R, L, H], run on ``buckets`` groups of rows.

    Rows are sorted by length (``attention_mask`` sums) and cut into groups of equal row count;
    each group is trimmed to its own longest row before the encoder sees it, and the outputs
    are padded back with zeros and put in the original row order. The token embeddings are looked
    up once for all rows and the groups get slices of them. Positions past a row's length
    hold other values than a single forward would give (never used: every loss reads real
    tokens only). With one bucket,
    or rows of one length, this is a single plain forward.
    """
    mask = inputs["attention_mask"]
    rows, width = mask.shape
    if buckets <= 1 or rows <= 1:
        return encoder(**inputs).last_hidden_state
    embed = encoder.get_input_embeddings()
    if embed is not None and "input_ids" in inputs:
        # One token-embedding lookup for all rows, sliced per group: backward then builds the
        # embedding's dense [vocab, H] gradient once per step, not once per group (for a
        # multilingual vocabulary of 120k x 768 that is 370 MB of fp32 per materialisation).
        inputs = dict(inputs)
        inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    groups = [g for g in torch.tensor_split(order, min(buckets, rows)) if g.numel()]
    tops = lengths[torch.stack([g[-1] for g in groups])].tolist()  # one host sync per step
    outputs = []
    for idx, top in zip(groups, tops):
        part = {k: v[idx, :top] for k, v in inputs.items()}
        h = encoder(**part).last_hidden_state  # [r, top, H]
        outputs.append(nn.functional.pad(h, (0, 0, 0, width - top)))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(rows, device=order.device)
    return torch.cat(outputs, dim=0)[inverse]


class MMKDModel(nn.Module):
    def __init__(self, student: nn.Module, teacher_hidden: int, loss: LossConfig, length_buckets: int = 1):
        super().__init__()
        self.student = student
        self.loss_cfg = loss
        self.length_buckets = length_buckets
        hidden = int(student.config.hidden_size)
        self.weights = {
            "token": loss.token_weight,
            "word": loss.word_weight,
            "sentence": loss.sentence_weight,
            "structure": loss.structure_weight,
        }
        if loss.token_weight > 0:
            mlm_head(student)  # fail now, not at the first step
        # The word level compares student and teacher word vectors in the teacher's space.
        self.word_map = nn.Linear(hidden, teacher_hidden) if (loss.word_weight > 0 and hidden != teacher_hidden) else None
        form = {"final_bn": loss.head_final_bn, "bias": loss.head_bias}
        self.sentence_heads = (
            SentenceHeads(hidden, teacher_hidden, loss.head_hidden, loss.head_out, loss.teacher_head_seed,
                          loss.teacher_head, loss.ema_decay, **form)
            if loss.sentence_weight > 0 else None
        )
        # The structure level's own projector + predictor (student) and frozen projector (teacher);
        # none with loss.structure_heads "none" (the matrices of the sentence vectors themselves).
        self.structure_heads = (
            StructureHeads(hidden, teacher_hidden, loss.head_hidden, loss.head_out, loss.teacher_head_seed, **form)
            if loss.structure_weight > 0 and loss.structure_heads == "mlp" else None
        )
        encoder_args = inspect.signature(student.base_model.forward).parameters
        self._pass_token_types = "token_type_ids" in encoder_args

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Losses of one batch: ``{"token", "word", "sentence", "structure", "total"}``.

        ``batch`` is a collated batch on this module's device; it must hold teacher_cls
        [B, H_T] and teacher_words [B, W, H_T] (from the shards, or filled in by the online
        teacher before the call).
        """
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._pass_token_types:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        hidden = encode_in_buckets(self.student.base_model, kwargs, self.length_buckets)  # [R, L, H]
        rows = batch["rows"]
        losses: dict[str, Tensor] = {}
        offset = 0
        if rows["tlm"]:
            h = hidden[offset : offset + rows["tlm"]]
            labels = batch["tlm_labels"]
            selected = labels != -100
            logits = mlm_head(self.student)(h[selected])  # [M, V], only where it is scored
            losses["token"] = tlm_loss(logits, labels[selected])
            offset += rows["tlm"]
        if rows["word"]:
            h = hidden[offset : offset + rows["word"]]
            pooled, _ = word_pool(
                h, batch["word_ids"], batch["n_words"], self.loss_cfg.word_pooling, backend=self.loss_cfg.kernels
            )
            student_words = self.word_map(pooled) if self.word_map is not None else pooled
            losses["word"] = word_infonce_loss(
                student_words,
                batch["teacher_words"].to(student_words.dtype),
                batch["word_valid"],
                batch["word_target"],
                sim=self.loss_cfg.word_sim,
                tau=self.loss_cfg.word_tau,
                anchor=self.loss_cfg.word_anchor,
                reduction=self.loss_cfg.word_reduction,
            )
            offset += rows["word"]
        if rows["sent"]:
            # The student's sentence vector of x ([CLS] or token mean), input of both levels;
            # teacher_cls holds the teacher's, pooled as teacher.sentence says.
            sent_mask = batch["attention_mask"][offset : offset + rows["sent"]]
            sent = sentence_vectors(hidden[offset : offset + rows["sent"]], sent_mask, self.loss_cfg.sentence_pooling)
            teacher_sent = batch["teacher_cls"].to(sent.dtype)
            if self.sentence_heads is not None:
                z, z_teacher = self.sentence_heads(sent, teacher_sent)
                losses["sentence"] = byol_loss(z, z_teacher)
            if self.loss_cfg.structure_weight > 0:
                if self.structure_heads is not None:
                    u, v = self.structure_heads(sent, teacher_sent)
                else:
                    u, v = sent, teacher_sent.detach()
                if self.loss_cfg.structure_columns == "global":
                    u_cols, v_cols = gather_columns(u, with_grad=True), gather_columns(v, with_grad=False)
                else:
                    u_cols = v_cols = None
                # Fused and tiled on CUDA (no N x M matrix); the torch reference elsewhere.
                losses["structure"] = structure_kl_loss(
                    u, v, self.loss_cfg.structure_tau, u_cols, v_cols, backend=self.loss_cfg.kernels
                )
        total = sum(self.weights[name] * value for name, value in losses.items())
        losses["total"] = total
        return losses

    def after_step(self) -> None:
        """Per optimizer step upkeep: the EMA teacher head, when chosen.

        Under ZeRO-3 the heads' parameters are partitioned (empty on each rank), so they are
        gathered around the update, which rank 0 makes and DeepSpeed re-partitions; every rank
        must call this (it is collective then).
        """
        heads = self.sentence_heads
        if heads is None or heads.teacher_head != "ema":
            return
        params = [*heads.g.parameters(), *heads.g_T.parameters()]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                heads.update_ema()
        else:
            heads.update_ema()

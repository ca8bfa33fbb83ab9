"""A reference-style MMKD step, for benchmarks/step_throughput.py only (not part of the package).

It computes the project's four losses (same formulas, same heads, same weights) the way the
public reference implementation of MMKD structures its step:

* the frozen teacher runs THREE times per step, one forward over the English sentence for each
  objective that needs it (word level, sentence level, structure level), under ``no_grad``;
* the student encodes the translation TWICE: one forward for the sentence heads and another
  for the structure heads, instead of one [CLS] shared by both;
* the token level (TLM) and the word level (masked English + translation) are their own student
  forwards too; the TLM one goes through the masked-LM's own ``labels=`` loss, i.e. vocabulary
  logits for every position, with the unselected positions ignored (-100) by the cross-entropy;
* the word level pools subwords with Python loops (over sentences, then over words) and runs one
  InfoNCE per sentence, instead of the vectorised ``word_pool`` + batched InfoNCE.

Each student forward gets its own row group with its own padding (trimmed to the group's longest
row), as separately tokenised reference inputs would have. Inputs come from the project's
collator in online-teacher mode (``MMKDCollator(..., teacher_tokenizer=...)``): the same student
rows, masks and word maps as the project's step, plus the teacher's token ids.

The losses equal ``MMKDModel.forward`` on the same batch (after ``fill_online_teacher``) up to
float rounding when dropout is off (eval mode): checked at benchmark start-up and by
tests/test_reference_step.py. In training mode the two translation forwards draw different
dropout masks, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _group_bounds(rows: dict) -> dict[str, tuple[int, int]]:
    """Row ranges of the tlm / word / sent groups in the collator's stacked batch."""
    bounds, offset = {}, 0
    for name in ("tlm", "word", "sent"):
        bounds[name] = (offset, offset + rows[name])
        offset += rows[name]
    return bounds


def _trimmed(batch: dict, start: int, end: int, *extra: str) -> list[Tensor]:
    """input_ids, attention_mask, token_type_ids (+ extra [R, L] tensors) of rows start:end,
    cut to the longest row of the group (its own padding, as a separate input would have)."""
    att = batch["attention_mask"][start:end]
    length = int(att.sum(dim=1).max())
    out = [batch["input_ids"][start:end, :length], att[:, :length], batch["token_type_ids"][start:end, :length]]
    for key in extra:
        out.append(batch[key][:, :length])
    return out


def _positions(word_ids_row: list[int]) -> dict[int, list[int]]:
    """Word index -> its subword positions in the row (Python lists, as the reference)."""
    where: dict[int, list[int]] = {}
    for t, w in enumerate(word_ids_row):
        if w >= 0:
            where.setdefault(w, []).append(t)
    return where


def _pool(h_row: Tensor, pos: list[int], pooling: str) -> Tensor:
    return h_row[pos[0]] if pooling == "first" else h_row[pos].mean(dim=0)


def reference_byol_loss(z: Tensor, z_teacher: Tensor) -> Tensor:
    """mean_i (2 - 2 cos(z_i, z'_i)), as the reference's byol_loss(...).mean()."""
    zn = F.normalize(z.float(), dim=-1, eps=1e-8)
    tn = F.normalize(z_teacher.detach().float(), dim=-1, eps=1e-8)
    return (2.0 - 2.0 * (zn * tn).sum(dim=-1)).mean()


def reference_corr_loss(u: Tensor, v: Tensor, tau: float = 1.0) -> Tensor:
    """KL(softmax(A_T) || softmax(A_S)), batch mean, with both N x N matrices materialised
    (the reference's compute_corr_loss, with the temperature of the project's formula)."""
    un = F.normalize(u.float(), dim=-1, eps=1e-8)
    vn = F.normalize(v.detach().float(), dim=-1, eps=1e-8)
    log_p_s = (un @ un.T / tau).log_softmax(dim=-1)
    p_t = (vn @ vn.T / tau).softmax(dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean")


class ReferenceStyleStep:
    """``losses(batch)`` -> ``{"token", "word", "sentence", "structure", "total"}`` like
    ``MMKDModel.forward``, computed reference-style (see the module docstring).

    ``model``: the project's MMKDModel (its student, word_map and heads are used as they are);
    ``teacher_model``: the frozen teacher encoder (``Teacher.model``); ``teacher_layer`` and
    ``teacher_pooling``: as ``TeacherConfig.layer`` / ``.pooling``.
    """

    def __init__(self, model: nn.Module, teacher_model: nn.Module, teacher_layer: int = -1, teacher_pooling: str = "mean"):
        self.model = model
        self.teacher = teacher_model
        self.teacher_layer = teacher_layer
        self.teacher_pooling = teacher_pooling
        self.teacher_forwards = 0  # counted, so that tests can check the reference's structure
        self.student_forwards = 0

    # -- the encoders ----------------------------------------------------------------------

    def teacher_encode(self, batch: dict) -> Tensor:
        """One teacher forward over the English sentences: hidden states [B, L_T, H_T], fp32."""
        self.teacher_forwards += 1
        with torch.no_grad():
            out = self.teacher(
                input_ids=batch["teacher_input_ids"],
                attention_mask=batch["teacher_attention_mask"],
                output_hidden_states=self.teacher_layer != -1,
            )
            hidden = out.last_hidden_state if self.teacher_layer == -1 else out.hidden_states[self.teacher_layer]
        return hidden.float()

    def student_encode(self, ids: Tensor, att: Tensor, types: Tensor) -> Tensor:
        self.student_forwards += 1
        kwargs = {"input_ids": ids, "attention_mask": att}
        if self.model._pass_token_types:
            kwargs["token_type_ids"] = types
        return self.model.student.base_model(**kwargs).last_hidden_state

    # -- the losses ------------------------------------------------------------------------

    def token_loss(self, batch: dict, start: int, end: int) -> Tensor:
        ids, att, types, labels = _trimmed(batch, start, end, "tlm_labels")
        self.student_forwards += 1
        kwargs = {"input_ids": ids, "attention_mask": att, "labels": labels}
        if self.model._pass_token_types:
            kwargs["token_type_ids"] = types
        return self.model.student(**kwargs).loss  # logits [B, L, V]; CE ignores label -100

    def word_loss(self, batch: dict, start: int, end: int) -> Tensor:
        cfg = self.model.loss_cfg
        ids, att, types, word_ids = _trimmed(batch, start, end, "word_ids")
        h = self.student_encode(ids, att, types)  # student forward: [CLS] e' [SEP] x [SEP]
        t_hidden = self.teacher_encode(batch)  # teacher forward 1 of 3: the word level's own
        s_where = [_positions(r) for r in word_ids.tolist()]
        t_where = [_positions(r) for r in batch["teacher_word_ids"].tolist()]
        valid = batch["word_valid"].tolist()
        target = batch["word_target"].tolist()
        total = h.new_zeros((), dtype=torch.float32)
        count = 0
        for i in range(h.shape[0]):  # one InfoNCE per sentence
            words = [j for j, ok in enumerate(valid[i]) if ok]
            if not words:
                continue
            s = torch.stack([_pool(h[i], s_where[i][j], cfg.word_pooling) for j in words]).float()
            t = torch.stack([_pool(t_hidden[i], t_where[i][j], self.teacher_pooling) for j in words])
            if self.model.word_map is not None:
                s = self.model.word_map(s)
            if cfg.word_sim == "cosine":
                s = F.normalize(s, dim=-1, eps=1e-8)
                t = F.normalize(t, dim=-1, eps=1e-8)
            # The authors' direction: teacher words are the anchors, softmax over student words.
            rows_, cols_ = (t, s) if cfg.word_anchor == "teacher" else (s, t)
            log_probs = (rows_ @ cols_.T / cfg.word_tau).log_softmax(dim=-1)
            scored = torch.tensor([bool(target[i][j]) for j in words])
            if not scored.any():
                continue
            per_word = (-log_probs.diagonal())[scored]
            if cfg.word_reduction == "sentence":  # mean per sentence, then over sentences
                total = total + per_word.mean()
                count += 1
            else:  # one mean over every scored word of the batch
                total = total + per_word.sum()
                count += len(per_word)
        return total / max(count, 1)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        model = self.model
        rows = batch["rows"]
        bounds = _group_bounds(rows)
        out: dict[str, Tensor] = {}
        if rows["tlm"]:
            out["token"] = self.token_loss(batch, *bounds["tlm"])
        if rows["word"]:
            out["word"] = self.word_loss(batch, *bounds["word"])
        if rows["sent"]:
            sent = _trimmed(batch, *bounds["sent"])
            if model.sentence_heads is not None:
                cls = self.student_encode(*sent)[:, 0]  # student forward of x, 1 of 2
                t_cls = self.teacher_encode(batch)[:, 0]  # teacher forward 2 of 3
                z, z_teacher = model.sentence_heads(cls, t_cls)
                out["sentence"] = reference_byol_loss(z, z_teacher)
            if model.structure_heads is not None:
                cls = self.student_encode(*sent)[:, 0]  # student forward of x, 2 of 2
                t_cls = self.teacher_encode(batch)[:, 0]  # teacher forward 3 of 3
                u, v = model.structure_heads(cls, t_cls)
                out["structure"] = reference_corr_loss(u, v, model.loss_cfg.structure_tau)
        out["total"] = sum(model.weights[name] * value for name, value in out.items())
        return out

"""Turning shard samples into one student batch (runs in the data-loader workers).

The student runs ONE encoder forward per step over up to three groups of rows, stacked and
padded to a common length (under ZeRO-3 that is one parameter gather instead of three):

    tlm rows   [CLS] e [SEP] x [SEP] with 15% of tokens selected (80/10/10)   token level
    word rows  [CLS] e' [SEP] x [SEP], e' = e with whole words masked (80/10/10) word level
    sent rows  [CLS] x [SEP]                                                   sentence + structure

A group whose objectives all have weight 0 is left out. Masking draws from a generator seeded
by (seed, epoch, rank, batch index), never from process state, so a resumed run masks exactly
as an uninterrupted one, whichever worker builds the batch.

English words come from the shard (the teacher's word list, already cut to the teacher's token
limit); the translation is split by the same pre-tokenizer. Inputs longer than
``max_tokens`` lose whole words, from the end of the translation first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmkd_ds.config.schema import LossConfig
from mmkd_ds.shards.format import ShardSample
from mmkd_ds.words import encode_words, split_words


@dataclass
class RowGroups:
    """Which objectives need which row groups."""

    tlm: bool
    word: bool
    sent: bool

    @classmethod
    def from_loss(cls, loss: LossConfig) -> "RowGroups":
        return cls(loss.token_weight > 0, loss.word_weight > 0, loss.sentence_weight > 0 or loss.structure_weight > 0)


def _word_counts(tokenizer, word_lists: list[list[str]]) -> list[list[int]]:
    """Subwords per word for each word list (one batched tokenizer call, no specials)."""
    if not any(word_lists):
        return [[] for _ in word_lists]
    safe = [w if w else ["."] for w in word_lists]  # the tokenizer rejects empty lists
    enc = tokenizer(safe, is_split_into_words=True, add_special_tokens=False)
    out = []
    for i, words in enumerate(word_lists):
        counts = [0] * len(words)
        for w in enc.word_ids(i):
            if w is not None and words:
                counts[w] += 1
        out.append(counts)
    return out


def _prefix_fitting(counts: list[int], budget: int) -> int:
    """Number of leading words whose subwords fit in ``budget``."""
    used = 0
    for n, c in enumerate(counts):
        if used + c > budget:
            return n
        used += c
    return len(counts)


class MMKDCollator:
    """Callable ``(samples, key) -> batch dict`` for the shard stream.

    ``teacher_tokenizer`` is given in online-teacher mode: the batch then carries the teacher's
    inputs instead of stored teacher vectors, and the English words are cut to the teacher's
    token limit here, as the precompute does.
    """

    def __init__(
        self,
        tokenizer,
        loss: LossConfig,
        max_tokens: int,
        seed: int,
        teacher_tokenizer=None,
        teacher_max_tokens: int = 128,
    ):
        self.tok = tokenizer
        self.loss = loss
        self.max_tokens = max_tokens
        self.seed = seed
        self.groups = RowGroups.from_loss(loss)
        self.teacher_tok = teacher_tokenizer
        self.teacher_max_tokens = teacher_max_tokens
        for name in ("pad_token_id", "mask_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"student tokenizer has no {name.replace('_id', '')}: a masked-LM tokenizer is needed")
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)

    # -- English words and the teacher side ---------------------------------------------------

    def _english(self, samples: list[ShardSample]) -> tuple[list[list[str]], list[list[int]], dict]:
        """English word lists, teacher subword counts, and the teacher tensors of the batch."""
        if self.teacher_tok is None:
            words = [s.words for s in samples]
            counts = [s.counts for s in samples]
            W = max(max(len(w) for w in words), 1)
            H = samples[0].cls.shape[-1]
            tw = torch.zeros(len(samples), W, H)
            for i, s in enumerate(samples):
                if len(s.words):
                    tw[i, : len(s.words)] = torch.from_numpy(s.word_vectors.astype(np.float32))
            teacher = {
                "teacher_cls": torch.from_numpy(np.stack([s.cls.astype(np.float32) for s in samples])),
                "teacher_words": tw,
            }
            return words, counts, teacher
        encs = [encode_words(self.teacher_tok, s.words or split_words(s.en), self.teacher_max_tokens) for s in samples]
        words = [(s.words or split_words(s.en))[: e.n_words] for s, e in zip(samples, encs)]
        L = max(len(e.input_ids) for e in encs)
        ids = torch.full((len(samples), L), self.teacher_tok.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros((len(samples), L), dtype=torch.long)
        wid = torch.full((len(samples), L), -1, dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[i, : len(e.input_ids)] = 1
            wid[i, : len(e.input_ids)] = torch.tensor(e.word_ids)
        teacher = {"teacher_input_ids": ids, "teacher_attention_mask": att, "teacher_word_ids": wid}
        return words, [e.counts for e in encs], teacher

    # -- the batch ------------------------------------------------------------------------------

    def __call__(self, samples: list[ShardSample], key: tuple[int, ...]) -> dict:
        rng = np.random.default_rng([self.seed, *key])
        B = len(samples)
        e_words, t_counts, teacher = self._english(samples)
        x_words = [split_words(s.xx) for s in samples]
        e_counts = _word_counts(self.tok, e_words)
        x_counts = _word_counts(self.tok, x_words)

        # Whole-word truncation: English first keeps what fits with one token to spare.
        pair_budget = self.max_tokens - 3
        n_e = [max(1, _prefix_fitting(c, pair_budget - 1)) if c else 0 for c in e_counts]
        n_x = [_prefix_fitting(xc, pair_budget - sum(ec[:n])) for ec, xc, n in zip(e_counts, x_counts, n_e)]
        n_xs = [_prefix_fitting(xc, self.max_tokens - 2) for xc in x_counts]
        e_kept = [w[:n] for w, n in zip(e_words, n_e)]
        x_kept = [w[:n] or ["."] for w, n in zip(x_words, n_x)]

        rows: list[list[int]] = []
        types: list[list[int]] = []
        batch: dict = {"langs": [s.lang for s in samples], "keys": [s.key for s in samples]}

        if self.groups.tlm or self.groups.word:
            pair = self.tok([w or ["."] for w in e_kept], x_kept, is_split_into_words=True)
            pair_ids = [list(ids) for ids in pair["input_ids"]]
            # Segment ids from the tokenizer's post-processor ([CLS] e [SEP] -> 0, x [SEP] -> 1 for
            # BERT; all 0 for RoBERTa-style): sequence_ids() is None on specials, not a segment.
            pair_types = [list(t) for t in pair["token_type_ids"]] if "token_type_ids" in pair else [
                list(pair.encodings[i].type_ids) for i in range(B)
            ]
            e_word_of = [
                [w if (s == 0 and w is not None and e_kept[i]) else -1 for w, s in zip(pair.word_ids(i), pair.sequence_ids(i))]
                for i in range(B)
            ]

        tlm_labels = None
        if self.groups.tlm:
            tlm_labels = []
            for i in range(B):
                ids, labels = self._tlm_mask(pair_ids[i], rng)
                rows.append(ids)
                types.append(pair_types[i])
                tlm_labels.append(labels)

        W = max(max(n_e), 1)
        if self.groups.word:
            target = torch.zeros(B, W, dtype=torch.bool)
            valid = torch.zeros(B, W, dtype=torch.bool)
            word_pos: list[list[int]] = []
            for i in range(B):
                scount = e_counts[i][: n_e[i]]
                ok = [j for j in range(n_e[i]) if scount[j] > 0 and j < len(t_counts[i]) and t_counts[i][j] > 0]
                valid[i, ok] = True
                masked = self._pick_words(ok, rng)
                target[i, masked] = True
                if self.loss.word_targets == "all":
                    target[i] = valid[i]
                rows.append(self._mask_words(pair_ids[i], e_word_of[i], set(masked), rng))
                types.append(pair_types[i])
                word_pos.append(e_word_of[i])
            batch["word_valid"] = valid
            batch["word_target"] = target

        if self.groups.sent:
            sent = self.tok([w[:n] or ["."] for w, n in zip(x_words, n_xs)], is_split_into_words=True)
            for i in range(B):
                rows.append(list(sent["input_ids"][i]))
                types.append([0] * len(sent["input_ids"][i]))

        L = max(len(r) for r in rows)
        R = len(rows)
        input_ids = torch.full((R, L), self.tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((R, L), dtype=torch.long)
        token_types = torch.zeros((R, L), dtype=torch.long)
        for r, (ids, tt) in enumerate(zip(rows, types)):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
            token_types[r, : len(tt)] = torch.tensor(tt)
        batch.update(input_ids=input_ids, attention_mask=attention, token_type_ids=token_types)
        batch["rows"] = {"tlm": B if self.groups.tlm else 0, "word": B if self.groups.word else 0, "sent": B if self.groups.sent else 0}

        if tlm_labels is not None:
            labels = torch.full((B, L), -100, dtype=torch.long)
            for i, lab in enumerate(tlm_labels):
                labels[i, : len(lab)] = torch.tensor(lab)
            batch["tlm_labels"] = labels
        if self.groups.word:
            wid = torch.full((B, L), -1, dtype=torch.long)
            for i, pos in enumerate(word_pos):
                wid[i, : len(pos)] = torch.tensor(pos)
            batch["word_ids"] = wid
            batch["n_words"] = W
        batch.update(teacher)
        if "teacher_word_ids" in batch:
            # Online mode: English words that the student rows dropped (truncation) have no slot
            # among the W word vectors (the precomputed path below cuts teacher_words to W too).
            batch["teacher_word_ids"] = batch["teacher_word_ids"].masked_fill(batch["teacher_word_ids"] >= W, -1)
        if "teacher_words" in batch and batch["teacher_words"].shape[1] != W:
            tw = torch.zeros(B, W, batch["teacher_words"].shape[-1])
            n = min(W, batch["teacher_words"].shape[1])
            tw[:, :n] = batch["teacher_words"][:, :n]
            batch["teacher_words"] = tw
        batch["n_tokens"] = int(attention.sum())
        return batch

    def _tlm_mask(self, ids: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """BERT masking: select tokens with tlm_mask_prob (at least one); 80/10/10."""
        candidates = [t for t, i in enumerate(ids) if i not in self.special_ids]
        labels = [-100] * len(ids)
        out = list(ids)
        if not candidates:
            return out, labels
        chosen = [t for t in candidates if rng.random() < self.loss.tlm_mask_prob]
        if not chosen:
            chosen = [candidates[int(rng.integers(len(candidates)))]]
        for t in chosen:
            labels[t] = ids[t]
            out[t] = self._corrupt(ids[t], rng)
        return out, labels

    def _corrupt(self, token: int, rng: np.random.Generator) -> int:
        """BERT's replacement of a selected token: 80% [MASK], 10% a random token, 10% kept."""
        u = rng.random()
        if u < 0.8:
            return self.tok.mask_token_id
        if u < 0.9:
            return self._random_token(rng)
        return token

    def _random_token(self, rng: np.random.Generator) -> int:
        """A vocabulary id drawn uniformly among the non-special tokens (as the authors' code)."""
        while True:
            t = int(rng.integers(self.vocab_size))
            if t not in self.special_ids:
                return t

    def _mask_words(self, ids: list[int], word_of: list[int], masked: set[int], rng: np.random.Generator) -> list[int]:
        """A word row's ids with the subwords of the ``masked`` English words replaced.

        ``loss.word_mask_mode``: "bert" draws each subword's fate on its own (80% [MASK], 10%
        random, 10% kept: the authors' ``whole_word_random_mask``); "mask" makes them all [MASK].
        """
        if self.loss.word_mask_mode == "mask":
            return [self.tok.mask_token_id if w in masked else t for t, w in zip(ids, word_of)]
        return [self._corrupt(t, rng) if w in masked else t for t, w in zip(ids, word_of)]

    def _pick_words(self, candidates: list[int], rng: np.random.Generator) -> list[int]:
        """Whole-word masking: round(word_mask_prob * n) words, at least 1, at most word_mask_max * n."""
        n = len(candidates)
        if n == 0:
            return []
        k = max(1, round(self.loss.word_mask_prob * n))
        k = min(k, max(1, int(self.loss.word_mask_max * n)))
        return sorted(int(c) for c in rng.choice(candidates, size=k, replace=False))


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (non-blocking from pinned memory); everything else as it is."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

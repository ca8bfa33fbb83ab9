"""Word-level pooling: mean (or first) of each word's subword states.

    word_pool(hidden [B, L, D], word_ids [B, L] int, n_words) -> (pooled [B, W, D], counts [B, W])

``word_ids[b, t]`` is the index of the word that subword ``t`` belongs to; ids < 0 (special
tokens, padding) belong to no word. A word with no subword gets a zero vector and count 0.
Only the vectorised torch reference exists so far; the Triton kernel dispatches on CUDA once
it lands.
"""

from __future__ import annotations

import torch


def word_pool_reference(
    hidden: torch.Tensor, word_ids: torch.Tensor, n_words: int, pooling: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch pooling, no Python loop over sentences or words. Accumulates in fp32.

    Args:
        hidden: [B, L, D] subword states.
        word_ids: [B, L] integer word index per subword, < 0 for none.
        n_words: W, the number of word slots per sentence (ids >= W are an error).
        pooling: "mean" of the word's subwords, or "first" subword.
    Returns:
        pooled [B, W, D] in hidden's dtype, counts [B, W] int64 (subwords per word).
    """
    if hidden.dim() != 3 or word_ids.shape != hidden.shape[:2]:
        raise ValueError(f"word_pool: hidden {tuple(hidden.shape)} and word_ids {tuple(word_ids.shape)} do not match")
    if word_ids.numel() and int(word_ids.max()) >= n_words:
        raise ValueError(f"word_pool: word id {int(word_ids.max())} >= n_words {n_words}")
    B, L, D = hidden.shape
    valid = word_ids >= 0
    # Flatten (sentence, word) into one slot index so one scatter serves the whole batch.
    slot = torch.where(valid, word_ids + torch.arange(B, device=hidden.device)[:, None] * n_words, B * n_words)
    counts = torch.zeros(B * n_words + 1, dtype=torch.int64, device=hidden.device)
    counts.index_add_(0, slot.reshape(-1), torch.ones_like(slot.reshape(-1)))
    counts = counts[:-1].view(B, n_words)
    if pooling == "mean":
        sums = torch.zeros(B * n_words + 1, D, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, slot.reshape(-1), hidden.reshape(-1, D).float())
        pooled = sums[:-1].view(B, n_words, D) / counts.clamp(min=1).unsqueeze(-1)
    elif pooling == "first":
        # The first subword of a word is the one whose predecessor has another id.
        prev = torch.cat([torch.full_like(word_ids[:, :1], -1), word_ids[:, :-1]], dim=1)
        first = valid & (word_ids != prev)
        first_slot = torch.where(first, slot, B * n_words)
        pooled_flat = torch.zeros(B * n_words + 1, D, dtype=torch.float32, device=hidden.device)
        pooled_flat.index_copy_(0, first_slot.reshape(-1)[first.reshape(-1)], hidden.reshape(-1, D)[first.reshape(-1)].float())
        pooled = pooled_flat[:-1].view(B, n_words, D)
    else:
        raise ValueError(f"word_pool: pooling must be mean or first, got {pooling!r}")
    return pooled.to(hidden.dtype), counts


def word_pool(
    hidden: torch.Tensor, word_ids: torch.Tensor, n_words: int, pooling: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool subword states into word vectors; see the module docstring for shapes."""
    return word_pool_reference(hidden, word_ids, n_words, pooling)

"""Export the student as a Hugging Face directory from a checkpoint of any ZeRO stage.

The fp32 weights are consolidated from the sharded optimizer state with DeepSpeed's
zero_to_fp32 (stage 3 partitions gathered), loaded into a fresh model of the student's config
and written with ``save_pretrained``, with the tokenizer, through a temporary directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskedLM

PREFIX = "student."


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 state dict from checkpoint ``ckpt_dir/tag`` of any ZeRO stage."""
    tag_dir = Path(ckpt_dir) / tag
    if not any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        # Stage 0 (no zero_optimization section): no ZeRO partitions, the module state is whole
        # in the model-states file (zero_to_fp32 cannot read such a checkpoint).
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def export_student(ckpt_dir: Path, tag: str, student_name: str, tokenizer, out_dir: Path) -> Path:
    """Write ``out_dir`` (config, weights, tokenizer); loadable by AutoModelForMaskedLM and AutoModel."""
    state = consolidated_state_dict(ckpt_dir, tag)
    student_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not student_state:
        raise RuntimeError(f"{ckpt_dir / tag}: no student weights in the checkpoint")
    config = AutoConfig.from_pretrained(student_name)
    model = AutoModelForMaskedLM.from_config(config)
    missing, unexpected = model.load_state_dict(student_state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    # Tied output embeddings are stored once; persistent buffers may be absent from old saves.
    missing = [k for k in missing if k not in tied and not k.endswith(("decoder.weight", "position_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"export: checkpoint does not fit the student config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir

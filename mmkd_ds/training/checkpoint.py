"""Checkpoints: DeepSpeed's sharded engine state on every rank, plus what exact resume needs.

Layout under ``<out_dir>/checkpoints``: one DeepSpeed tag per save (``step00000100``) and the
``latest`` file, written by rank 0 only after every rank has finished its part of the save (so
a save cut short, on any rank, is never picked up). The client state
holds the step, the data-stream state, the run's settings (all of them, and a hash of those that
decide the computation) and its resolved learning-rate schedule; each rank also writes its RNG
states (dropout) next to its shard of the engine state.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mmkd_ds.config.loader import config_to_dict
from mmkd_ds.config.schema import RunConfig

# Settings that may change between a run and its resumption without changing what it computes.
_RESUME_FREE = {"train.steps", "train.epochs", "train.stop_at", "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
                "train.export", "train.allow_resume_changes", "stream.num_workers", "precompute.progress"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fingerprint(cfg: RunConfig) -> dict:
    """The flattened settings that decide the computation (compared on resume)."""
    flat = _flatten(config_to_dict(cfg))
    return {k: v for k, v in flat.items() if k not in _RESUME_FREE}


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config_fingerprint(cfg), sort_keys=True, default=str).encode()).hexdigest()


def run_settings(cfg: RunConfig) -> dict:
    """Every flattened setting of the run, as JSON stores it (the checkpoint's ``settings``)."""
    return json.loads(json.dumps(_flatten(config_to_dict(cfg)), default=str))


_UNSET = object()  # a setting one side does not have (added or removed since)


def _shown(value, width: int = 60) -> str:
    text = "(unset)" if value is _UNSET else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def settings_changes(state: dict, cfg: RunConfig) -> str:
    """One line for every resume: which settings differ from the checkpoint's, old -> new.

    Settings that change what is computed (those in :func:`config_fingerprint`) are marked.
    Checkpoints written before ``settings`` was stored hold the fingerprint only, so changes of
    the other settings (``train.steps``, logging, ...) cannot be listed for them; the line says so.
    """
    now = run_settings(cfg)
    saved = state.get("settings")
    older = saved is None
    if older:
        saved = state.get("config", {})
        now = {k: v for k, v in now.items() if k not in _RESUME_FREE}
    changes = []
    for key in sorted(set(saved) | set(now)):
        was, is_ = saved.get(key, _UNSET), now.get(key, _UNSET)
        if was != is_:
            mark = "" if key in _RESUME_FREE else " [changes what is computed]"
            changes.append(f"{key} {_shown(was)} -> {_shown(is_)}{mark}")
    line = (f"resume: {len(changes)} setting{'s' if len(changes) != 1 else ''} changed since the checkpoint: "
            + "; ".join(changes) if changes else "resume: no setting changed since the checkpoint")
    return line + (" (an older checkpoint: only settings that change what is computed were recorded)" if older else "")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


STATE_FILE = "mmkd_state.json"


class ResumeError(ValueError):
    """A checkpoint that this run may not continue from (the message names the field)."""


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int) -> str:
    """Save on every rank (DeepSpeed shards the engine state); returns the tag.

    ``latest`` names only complete tags. DeepSpeed's own ``latest`` is written by rank 0 as soon
    as *its* files are done, while other ranks may still be writing their optimizer shards, so a
    rank killed in that window would leave ``latest`` naming a partial save. Here every rank
    finishes, a barrier follows, and only then rank 0 replaces ``latest`` (write and rename).
    ``client_state`` also goes to a JSON file, readable before DeepSpeed loads anything.
    """
    tag = tag_of(step)
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        (ckpt_dir / tag / STATE_FILE).write_text(json.dumps(client_state, indent=1, sort_keys=True, default=str))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shard is on disk
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
    if torch.distributed.is_initialized():
        # No rank leaves before `latest` exists: a job manager that ends the whole job when the
        # first node exits (srun --kill-on-bad-exit) cannot cut the write short.
        torch.distributed.barrier()
    return tag


def read_run_state(ckpt_dir: Path) -> dict | None:
    """The client state of the latest checkpoint, or None when there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path = ckpt_dir / tag / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{path}: missing; this checkpoint was not written by mmkd-ds")
    return json.loads(path.read_text())


def check_resume(state: dict, world_size: int, stream_state: dict, allow_changes: bool) -> None:
    """Refuse a resume that would silently change what is trained, naming the field.

    Another corpus (shard set or fingerprint) or stream seed changes the data itself. Another
    world size or batch size is an elastic resume (training/elastic.py): the global batch is
    kept or refused there, and the epoch's unread samples are planned anew.
    """
    if allow_changes:
        return
    saved_stream = state.get("stream", {})
    checks = [
        ("corpus fingerprint", saved_stream.get("fingerprint"), stream_state["fingerprint"]),
        ("shard set", saved_stream.get("shards"), stream_state["shards"]),
        ("stream.seed", saved_stream.get("seed"), stream_state["seed"]),
    ]
    for name, saved, now in checks:
        if saved != now:
            shown = (saved, now) if name not in ("shard set",) else ("one list", "another")
            raise ResumeError(
                f"cannot resume: {name} was {shown[0]!r} at the checkpoint and is {shown[1]!r} now "
                "(set train.allow_resume_changes=true to continue anyway)"
            )


def zero_stage_from_files(tag_dir: Path) -> str:
    """"0", "1 or 2" or "3" ("unknown" if none matches): the ZeRO stage a DeepSpeed checkpoint
    was written with, from the file names each stage writes (for checkpoints that do not record
    ``zero_stage`` in their state)."""
    if any(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return "3"
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        return "1 or 2"
    return "0" if (tag_dir / "mp_rank_00_model_states.pt").is_file() else "unknown"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def seed_rank_rng(seed: int, step: int, rank: int) -> None:
    """Seed this rank's RNGs from (seed, step, rank): a rank the checkpoint has no RNG state for
    (a resume on more ranks) gets a reproducible stream of its own."""
    ss = np.random.SeedSequence([int(seed), int(step), int(rank)])
    value = int(ss.generate_state(1, dtype=np.uint32)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def load_checkpoint(engine, ckpt_dir: Path, rank: int, universal: Path | None = None, seed: int = 0) -> dict | None:
    """Restore the latest checkpoint into ``engine`` and this rank's RNG; return client state.

    ``universal``: the checkpoint's DeepSpeed universal folder, for an engine built with
    ``load_universal`` (a resume on another world size or ZeRO stage; see elastic.py). Each rank
    restores its own RNG file; a rank that has none (more ranks than the checkpoint's) is
    seeded from (seed, step, rank) instead.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    load_tag = universal.name if universal is not None else tag
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / load_tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif universal is not None:
        seed_rank_rng(seed, int(client_state.get("step", 0)), rank)
    else:
        raise RuntimeError(f"{rng_file}: missing (was the checkpoint written by a different world size?)")
    return client_state


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` tags (rank 0 only; never the one `latest` names)."""
    if keep <= 0:
        return
    # Tags only: a tag's universal conversion (<tag>_universal, elastic.py) goes with its tag.
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit())
    current = latest_tag(ckpt_dir)
    for old in tags[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
            for converted in ckpt_dir.glob(f"{old.name}_universal*"):
                shutil.rmtree(converted, ignore_errors=True)

"""The fine-tuning engine of the transfer tasks (XNLI, PAWS-X, XQuAD): one process or many.

One process (``mmkd-eval`` / ``python launchers/evaluate.py``): a plain torch loop, bf16
autocast on CUDA, fp32 on CPU. Several processes (``deepspeed --num_gpus 8
launchers/evaluate.py ... --deepspeed_config ds_configs/zero2.json``), or one process given
``--deepspeed_config``: a DeepSpeed engine, data-parallel over the ranks, ZeRO stage and options
from the JSON; batch size, clipping and precision from here (bf16 on CUDA), AdamW and the
warm-up/decay schedule from here (the JSON's optimizer, scheduler and monitor sections are
dropped: results go out through :class:`~mmkd_ds.evaluation.report.TaskResult`).

Batches are *global*: every rank draws the same seeded permutation and takes every W-th item of
each global batch of ``batch_size`` examples (rank r: items r, r+W, ...). Its mean loss is scaled
by ``n_local * W / n_global`` before backward, so DeepSpeed's averaging of the gradients over
the W ranks gives the gradient of the mean loss over the whole global batch: the same update as
one process over that batch, whatever the world size (tested: 2 ranks match 1 process). A final
batch smaller than W is dropped (no rank may be left without data); with W = 1 nothing is.

Evaluation is sharded too: rank r scores examples r, r+W, ... and the counts or predictions are
combined across ranks. Every rank runs the same number of forwards (ranks with fewer batches
repeat a batch and discard it), which ZeRO-3 needs: its forward gathers parameters collectively.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mmkd_ds.distributed import ProcessPlace

log = logging.getLogger(__name__)

# No weight decay on biases and normalisation weights, as in BERT fine-tuning.
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# DeepSpeed JSON sections that this engine owns or does not use.
_DROPPED_SECTIONS = ("optimizer", "scheduler", "tensorboard", "wandb", "csv_monitor", "comet")


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of one fine-tuning run (recorded in the result's settings)."""

    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 32  # global: summed over the data-parallel ranks
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 42

    def validate(self, who: str) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"{who}: lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{who}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def steps(self, n_train: int, world_size: int) -> tuple[int, int]:
        """``(steps per epoch, warm-up steps)`` for ``n_train`` training items."""
        per_epoch = len(global_batches(n_train, self.batch_size, world_size))
        total = per_epoch * self.epochs
        warmup = max(1, int(self.warmup_ratio * total)) if self.warmup_ratio > 0 else 0
        return per_epoch, warmup


def global_batches(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the global batches over ``n`` items; a last batch < world is dropped."""
    spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if spans and spans[-1][1] - spans[-1][0] < world_size:
        spans.pop()
    return spans


@dataclass(frozen=True)
class Runtime:
    """Where fine-tuning runs: the rank's place in the job, its device, and the backend."""

    place: ProcessPlace
    device: torch.device
    deepspeed_config: dict | None  # None: plain torch, one process

    @property
    def world_size(self) -> int:
        return self.place.world_size

    @property
    def is_main(self) -> bool:
        return self.place.is_main

    @property
    def precision(self) -> str:
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"

    def describe(self) -> dict:
        """What the result's settings record about the run's hardware and backend."""
        backend = "torch"
        if self.deepspeed_config is not None:
            backend = f"deepspeed ZeRO-{self.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}"
        return {"device": str(self.device), "world_size": self.world_size, "backend": backend,
                "precision": self.precision}


def start_runtime(deepspeed_config: str | Path | None = None, device: torch.device | str | None = None) -> Runtime:
    """Join the launcher's process group when there is one, and pick the device.

    A job of several ranks (WORLD_SIZE > 1) or an explicit ``deepspeed_config`` runs on
    DeepSpeed; otherwise plain torch on ``device`` (default: CUDA when available).
    """
    from mmkd_ds.distributed import init_distributed, process_place

    place = process_place()
    if place.world_size == 1 and deepspeed_config is None:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Runtime(place, dev, None)
    ds = _read_ds_json(deepspeed_config)
    place, dev = init_distributed()
    return Runtime(place, dev, ds)


def _read_ds_json(path: str | Path | None) -> dict:
    if path is None:
        return {"zero_optimization": {"stage": 0}}  # plain data parallelism
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(_NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` (0: none), then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Finetuner:
    """A model with its optimizer and schedule, on one process or data-parallel over many.

    Use :meth:`epoch_batches` for this rank's share of each global batch, :meth:`train_step`
    per batch, :meth:`reduce_mean` for the epoch's mean loss, then :meth:`run_forwards` and
    :meth:`gather` to evaluate on every rank's share of the test data.
    """

    def __init__(self, model: torch.nn.Module, runtime: Runtime, settings: FinetuneSettings, total_steps: int,
                 warmup_steps: int):
        self.runtime = runtime
        self.settings = settings
        model.to(runtime.device)
        optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
        scheduler = build_scheduler(optimizer, warmup_steps, total_steps)
        if runtime.deepspeed_config is None:
            self.engine = None
            self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        else:
            import deepspeed

            config = self._deepspeed_config(runtime.deepspeed_config)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=config)
            self.model = self.engine.module
        self.model.train()

    def _deepspeed_config(self, json_config: dict) -> dict:
        world = self.runtime.world_size
        micro = math.ceil(self.settings.batch_size / world)
        ds = {k: v for k, v in json_config.items() if k not in _DROPPED_SECTIONS}
        ds.update({
            # Each rank's share of a global batch is at most `micro` items; DeepSpeed only needs
            # a consistent triple here, the loss scaling in train_step does the averaging.
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro * world,
            "gradient_clipping": self.settings.grad_clip,
            "bf16": {**ds.get("bf16", {}), "enabled": self.runtime.precision == "bf16"},
            "fp16": {**ds.get("fp16", {}), "enabled": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        })
        if ds.get("zero_optimization", {}).get("offload_optimizer"):
            ds.setdefault("zero_force_ds_cpu_optimizer", False)  # client AdamW with offload
        return ds

    # -- training ---------------------------------------------------------------------------

    def epoch_batches(self, n_train: int, generator: torch.Generator) -> list[tuple[list[int], int]]:
        """This rank's ``(item indices, global batch size)`` per step of one epoch.

        Draws one permutation from ``generator`` (the same on every rank, seeded alike).
        """
        order = torch.randperm(n_train, generator=generator).tolist()
        rank, world = self.runtime.place.rank, self.runtime.world_size
        out = []
        for start, end in global_batches(n_train, self.settings.batch_size, world):
            out.append((order[start:end][rank::world], end - start))
        return out

    def autocast(self):
        """bf16 autocast for the plain-torch path on CUDA (the DeepSpeed engine casts itself)."""
        if self.engine is None and self.runtime.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: dict[str, torch.Tensor], n_local: int, n_global: int) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; its mean loss, detached.

        ``batch`` holds the model's inputs and labels on :attr:`device`; the model returns
        ``.loss`` (the mean over the local items).
        """
        with self.autocast():
            loss = self.model(**batch).loss if self.engine is None else self.engine(**batch).loss
        scaled = loss * (n_local * self.runtime.world_size / n_global)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            if self.settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.engine.backward(scaled)
            self.engine.step()
        return loss.detach().float()

    def reduce_mean(self, weighted_sum: torch.Tensor | float, count: int) -> float:
        """Σ over ranks of ``weighted_sum`` / Σ over ranks of ``count``."""
        total, n = self.sum([float(weighted_sum), float(count)])
        return total / n if n else float("nan")

    # -- evaluation -------------------------------------------------------------------------

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` for evaluation (rank r: items r, r+W, ...)."""
        return items[self.runtime.place.rank :: self.runtime.world_size]

    def run_forwards(self, batches: list[dict[str, torch.Tensor]], filler: dict[str, torch.Tensor],
                     read: Callable[[Any], Any]) -> list:
        """``read(outputs)`` of an eval-mode, no-grad forward per batch, in order.

        Every rank runs as many forwards as the rank with the most batches; the extra ones run
        ``filler`` (any valid batch) and are discarded. ZeRO-3 gathers parameters inside the
        forward, collectively, so a rank that stopped early would hang the others.
        """
        n = len(batches)
        if self.engine is not None:
            t = torch.tensor([n], device=self.runtime.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            n_max = int(t.item())
        else:
            n_max = n
        model = self.model if self.engine is None else self.engine
        was_training = self.model.training
        model.eval()
        out = []
        try:
            # no_grad, not inference_mode: ZeRO-3 swaps parameter storage during the forward.
            with torch.no_grad():
                for i in range(n_max):
                    batch = batches[i] if i < n else filler
                    batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
                    with self.autocast():
                        result = read(model(**batch))
                    if i < n:
                        out.append(result)
        finally:
            model.train(was_training)
        return out

    def gather(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
        if self.engine is None:
            return [obj]
        gathered: list = [None] * self.runtime.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.runtime.device)
        if self.engine is not None:
            torch.distributed.all_reduce(t)
        return t.tolist()

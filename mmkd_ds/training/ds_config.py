"""The DeepSpeed config of a run: the JSON file's ZeRO and monitor settings, plus the values
that the run's YAML owns (batch, accumulation, clipping, precision, TensorBoard location).

The YAML is the one place for the training hyper-parameters: where the JSON says otherwise,
the YAML wins and the difference is reported, so a copied JSON cannot silently change a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmkd_ds.config.schema import RunConfig


def resolve_precision(requested: str, device_type: str) -> str:
    """"auto" -> bf16 on CUDA, fp32 elsewhere (CPU training runs in fp32)."""
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return requested


def build_ds_config(path: str | Path | None, cfg: RunConfig, world_size: int, device_type: str) -> tuple[dict, list[str]]:
    """The config dict for ``deepspeed.initialize`` and the notes on what the YAML overrode."""
    ds: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    notes: list[str] = []
    precision = resolve_precision(cfg.train.precision, device_type)
    owned = {
        "train_micro_batch_size_per_gpu": cfg.stream.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.stream.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] not in (value, "auto"):
            notes.append(f"{key}: {ds[key]} in the DeepSpeed JSON, {value} from the run config")
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            notes.append(f"{key}: the DeepSpeed JSON's section is ignored; train.* configures it")
            del ds[key]
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    # The project's scalars go through engine.monitor; keep the JSON's monitors and make sure
    # TensorBoard is one of them, writing into the run directory.
    tb = ds.get("tensorboard", {})
    if tb.get("enabled", True):
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(cfg.train.out_dir) / "tensorboard"),
                             "job_name": tb.get("job_name", "distill")}
    ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    # Client AdamW with ZeRO-Offload: allowed (DeepSpeedCPUAdam needs a compiled op).
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds, notes

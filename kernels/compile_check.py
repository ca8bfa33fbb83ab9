"""Ahead-of-time compile checks for the Triton kernels, on a machine with no GPU.

Triton ships the NVIDIA backend with its own ``ptxas``, so a kernel can be compiled for any
compute capability without a device. This module compiles the launches that the project's
*real* launch functions make and reports what the hardware would have to provide:

    with capture_launches(structure_kl_module, (9, 0)) as launches:
        structure_kl_module.structure_kl_forward(student_meta, teacher_meta, None, None, 0.1)
    for launch in launches:
        result = compile_launch(launch, (9, 0))  # CompileResult: shared bytes, registers, spills

How the launch is captured
--------------------------
Every kernel module launches its kernels as ``_kernel[grid](*args, **meta)`` through a module
global and asks ``module._target_capability(device)`` for the compute capability its launch
configuration table is keyed on. :func:`capture_launches` swaps both for the duration of a
``with`` block: the kernels for recorders that store the call instead of running it, and the
capability for the target's. The launch functions are then called with tensors on the
``meta`` device (shapes, strides and dtypes, no storage), so block sizes, warps, stages,
constexprs and argument dtypes are exactly those the code passes on a GPU; nothing is restated.

:func:`compile_launch` then specialises the recorded arguments with Triton's own binder (the
code path of ``JITFunction.run``: integer and pointer-alignment specialisation included),
compiles for ``GPUTarget("cuda", cc, 32)`` and reads the shared memory from the compiled
metadata and the registers / spill bytes from the ptxas log (``knobs.nvidia.dump_ptxas_log``).
It must run in a process where ``TRITON_INTERPRET`` was unset when triton was imported (the
interpreter replaces the JIT functions).

Per-block shared-memory limits are the opt-in maxima (``cudaDevAttrMaxSharedMemoryPerBlockOptin``)
of :data:`TARGETS`; registers are capped at 255 per thread by the hardware, and the project's
target is zero spill bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "TARGETS",
    "Target",
    "Launch",
    "CompileResult",
    "capture_launches",
    "compile_launch",
    "compile_all",
]


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU generation the kernels must fit on."""

    name: str  # "sm_90"
    capability: tuple[int, int]
    shared_limit: int  # bytes of shared memory one block may use (opt-in maximum)
    examples: str  # parts users run


#: The GPUs the kernels are checked for (per-block opt-in shared memory from the CUDA guide).
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_80", (8, 0), 166_912, "A100, A30"),
        Target("sm_86", (8, 6), 101_376, "A10, A40, RTX 3090"),
        Target("sm_89", (8, 9), 101_376, "L4, L40, RTX 4090"),
        Target("sm_90", (9, 0), 232_448, "H100, H200"),
    )
}
MAX_REGISTERS = 255


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call (arguments may be meta tensors)."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclasses.dataclass
class CompileResult:
    """What one compiled launch needs from the hardware."""

    kernel: str
    target: str
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]
    key: str  # identifies the compilation (source, specialisation, options, target)

    def problems(self, target: Target) -> list[str]:
        """Why this launch would fail or run degraded on ``target`` (empty: it fits)."""
        out = []
        if self.shared > target.shared_limit:
            out.append(f"shared {self.shared} B > {target.shared_limit} B")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills: {self.spill_stores} B stores, {self.spill_loads} B loads")
        return out


class _Recorder:
    """Stands in for a JIT function: ``rec[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid: Any):
        def record(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, grid, args, kwargs))

        return record


def _is_jit_function(obj: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(obj, JITFunction)


@contextlib.contextmanager
def capture_launches(module: ModuleType, capability: tuple[int, int]) -> Iterator[list[Launch]]:
    """Record the kernel launches made through ``module`` while targeting ``capability``.

    Inside the block every module-level JIT function of ``module`` is a recorder, and
    ``module._target_capability`` returns ``capability`` for any device (meta tensors
    included). Yields the list the launches are appended to.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile checks need TRITON_INTERPRET unset (the interpreter replaces the JIT functions)")
    if not hasattr(module, "_target_capability"):
        raise TypeError(f"{module.__name__} has no _target_capability(device) to key its launch configuration on")
    launches: list[Launch] = []
    saved = {name: obj for name, obj in vars(module).items() if _is_jit_function(obj)}
    if not saved:
        raise TypeError(f"{module.__name__} defines no Triton JIT function")
    original_capability = module._target_capability
    try:
        for name, obj in saved.items():
            setattr(module, name, _Recorder(obj, launches))
        module._target_capability = lambda device: tuple(capability)
        yield launches
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
        module._target_capability = original_capability


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _specialise(launch: Launch, target: Any) -> tuple[Any, dict, Any]:
    """``(ASTSource, options dict, backend)`` for ``launch`` on ``target``, as JITFunction.run makes them."""
    from triton import knobs
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    # The same implicit options JITFunction.run adds before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, backend


def _constexpr_names(launch: Launch, src: Any) -> dict[str, Any]:
    names = launch.kernel.arg_names
    return {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}


def compile_key(launch: Launch, capability: tuple[int, int]) -> str:
    """A hash that changes with the kernel source, its specialisation, options, target and triton."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    src, options, _ = _specialise(launch, target)
    blob = json.dumps([triton.__version__, src.hash(), sorted((k, repr(v)) for k, v in options.items()), capability])
    return hashlib.sha256(blob.encode()).hexdigest()


def compile_launch(launch: Launch, capability: tuple[int, int]) -> CompileResult:
    """Compile ``launch`` for ``capability`` (PTX and cubin; no GPU needed) and measure it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    cc = capability[0] * 10 + capability[1]
    target = GPUTarget("cuda", cc, 32)
    src, options, _ = _specialise(launch, target)
    key = compile_key(launch, capability)
    log = io.StringIO()
    # A private cache directory: ptxas (and its log) runs on every call, and the user's
    # ~/.triton cache is neither read nor filled with cubins of foreign targets.
    with tempfile.TemporaryDirectory(prefix="mmkd-compile-") as cache_dir:
        with knobs.nvidia.scope(), knobs.cache.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.cache.dir = cache_dir
            compiled = triton.compile(src, target=target, options=options)
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read registers / spills of {launch.name} from the ptxas log:\n{text}")
    return CompileResult(
        kernel=launch.name,
        target=f"sm_{cc}",
        shared=int(compiled.metadata.shared),
        registers=int(regs.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        num_warps=int(options["num_warps"]),
        num_stages=int(options["num_stages"]),
        constexprs=_constexpr_names(launch, src),
        key=key,
    )


_PENDING: list[tuple[Launch, tuple[int, int]]] = []  # read by forked workers of compile_all


def _compile_pending(i: int) -> CompileResult:
    launch, capability = _PENDING[i]
    return compile_launch(launch, capability)


def compile_all(
    jobs: Sequence[tuple[Launch, tuple[int, int]]], cache_file: Path | None = None, workers: int | None = None
) -> list[CompileResult]:
    """Compile every ``(launch, capability)``, each distinct compilation once.

    Identical compilations (same kernel source, specialisation, warps, stages and target,
    e.g. two head widths that pick the same D-chunked configuration) share one result.
    ``cache_file`` (JSON, keyed by :func:`compile_key`) keeps results across runs: a change
    to a kernel's source, its launch configuration or the triton version changes the key.
    Missing results are compiled by ``workers`` forked processes (default: one per CPU);
    compilation is CPU-bound (LLVM, ptxas) and independent per launch.
    """
    cache: dict[str, dict] = {}
    if cache_file is not None and cache_file.exists():
        with contextlib.suppress(ValueError, OSError):
            cache = json.loads(cache_file.read_text())
    keys = [compile_key(launch, capability) for launch, capability in jobs]
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in cache and key not in todo:
            todo[key] = i
    if todo:
        import multiprocessing

        _PENDING[:] = list(jobs)
        try:
            n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
            if n == 1:
                fresh = [_compile_pending(i) for i in todo.values()]
            else:
                with multiprocessing.get_context("fork").Pool(n) as pool:
                    fresh = pool.map(_compile_pending, list(todo.values()), chunksize=1)
        finally:
            _PENDING.clear()
        for key, res in zip(todo, fresh):
            cache[key] = dataclasses.asdict(res)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=0, sort_keys=True, default=repr))
    return [CompileResult(**cache[key]) for key in keys]

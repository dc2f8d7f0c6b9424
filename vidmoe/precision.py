"""Which precision to compute in (bf16 autocast only where the hardware makes it fast), and compiled code checked."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX tiles or AVX512-BF16), where bf16 autocast trains faster.

    On a 2-core Xeon with AMX a bouncing_small step took 342 ms in bf16 against 383 in fp32 (session 24,
    `vidmoe bench`). On a 2-core AMD EPYC with AVX512-BF16 and no AMX, `vidmoe train` on bouncing_small
    ran 310 steps in two minutes in bf16 against 215 in fp32 (session 26; the bench's step: 335 against
    524 ms eager, 332 against 405 ms with train.compile). Before vidmoe wrote attention out for short
    sequences (`layers.attention`) EPYCs of that kind had been faster in fp32: torch's fused attention
    backward in bf16 was 4x slower there. Without either flag bf16 is emulated (on an AVX2-only CPU a
    step took about 30 s in bf16 against 2.4 s in fp32).
    """
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """Turn a config value (auto | bf16 | fp16 | no) into what Accelerate should use on this device."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "no"
    return "no"


def autocast_dtype(setting: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)


# Inductor's AVX-512 code for a compiled sub-block's attention-and-norm region returned NaN in bf16 on
# an Intel Xeon (family 6 model 207, AVX512-BF16, AMX hidden by the hypervisor; torch 2.14.1): every
# training step's loss was non-finite, while the same region compiled for 256-bit vectors, or eager, was
# right. The same code was right on AMD EPYCs and AMX Xeons, so the compiled regions check themselves.
FALLBACK_COMPILE_OPTIONS = ({"cpp.simdlen": 256}, None)  # then None: eager


class CheckedCompile:
    """torch.compile of ``fn`` that checks itself against ``fn`` on the first call of each input signature.

    The compiled output of that first call is compared with an eager call made without gradients; if it
    is non-finite where the eager one is finite, or off by more than ``rtol`` (in norm), the function is
    compiled again for 256-bit vectors, and if that is wrong too it runs eager, with a warning each time.
    Later calls of a checked signature cost nothing extra. ``fn`` must be deterministic (no dropout).
    """

    def __init__(self, fn, rtol: float = 0.05, **options):
        self.fn, self.rtol, self.options = fn, rtol, options
        self.compiled = torch.compile(fn, dynamic=False, **options)
        self.fallbacks = list(FALLBACK_COMPILE_OPTIONS)
        self.checked: set = set()

    def __call__(self, *args):
        out = self.compiled(*args)
        key = (torch.is_grad_enabled(), torch.is_autocast_enabled(_device_type(args)), _signature(args))
        if key in self.checked:
            return out
        with torch.no_grad():
            want = self.fn(*args)
        while self.fallbacks and not self.agrees(out, want):  # the last fallback, eager, is the reference
            patch = self.fallbacks.pop(0)
            warnings.warn(f"torch.compile gave wrong values for {getattr(self.fn, '__qualname__', self.fn)} "
                          f"on this machine; {'recompiling with ' + str(patch) if patch else 'running it eager'}",
                          stacklevel=2)
            if patch is None:
                self.compiled = self.fn
            else:
                options = {**self.options, "options": {**self.options.get("options", {}), **patch}}
                self.compiled = torch.compile(self.fn, dynamic=False, **options)
            self.checked.clear()  # the new function is checked afresh
            out = self.compiled(*args)
        self.checked.add(key)
        return out

    def agrees(self, got, want) -> bool:
        for g, w in zip(_tensors(got), _tensors(want)):
            g, w = g.detach().float(), w.float()
            if not torch.isfinite(g).all() and torch.isfinite(w).all():
                return False
            if torch.linalg.vector_norm(g - w) > self.rtol * torch.linalg.vector_norm(w) + 1e-6:
                return False
        return True


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _signature(value):
    """The shapes and dtypes of the tensors in ``value`` (nested tuples and lists), the types of the rest."""
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return type(value).__name__


def _device_type(args) -> str:
    return next((t.device.type for t in _tensors(list(args))), "cpu")

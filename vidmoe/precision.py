"""Which precision to compute in: bf16 autocast only where the hardware makes it fast."""

from __future__ import annotations

import functools
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

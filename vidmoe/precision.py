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
    """True on CPUs with AMX tiles, where bf16 autocast makes matrix products several times faster.

    A whole bouncing_small step gains less, being mostly small products, attention and elementwise
    work: on a 2-core Xeon with AMX, 518 ms in bf16 against 549 ms in fp32 (temporal patch 4: 323
    against 330 ms), side by side in one run (session 22).

    AVX512-BF16 alone is not enough: on a 2-core AMD EPYC with it (no AMX) a bouncing_small step
    took 1.4-1.5 s in bf16 autocast against 0.7-1.0 s in fp32. Its bf16 matrix products were 2-4x faster
    than fp32, but attention's backward was 4x slower and the casts cost more than that saved.
    """
    return "amx_bf16" in cpu_flags()


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

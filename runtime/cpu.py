"""What this CPU can do, from /proc/cpuinfo: the instruction-set flags that change which
kernels ONNX Runtime and OpenVINO pick (part of their cached artifacts' keys) and
whether bf16 runs natively (the `auto` precision)."""

from __future__ import annotations

import functools
import platform

# flags that change which kernels the CPU backends' optimizers and compilers pick
ISA_FLAGS = ("avx512_bf16", "avx512_vnni", "avx512f", "amx_tile", "avx2", "fma",
             "avx", "sse4_2", "asimd", "sve", "bf16", "i8mm")  # (unchanged: ort-cpu cache keys)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPUs whose matrix units run bf16


@functools.lru_cache(maxsize=1)
def flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa() -> str:
    """e.g. 'x86_64:avx,avx2,avx512f,fma,sse4_2': part of CPU artifacts' cache keys."""
    return f"{platform.machine()}:{','.join(sorted(flags().intersection(ISA_FLAGS)))}"


def bf16_flags() -> frozenset[str]:
    """Which of BF16_FLAGS this CPU has (empty: no native bf16)."""
    return flags().intersection(BF16_FLAGS)


def has_bf16() -> bool:
    return bool(bf16_flags())

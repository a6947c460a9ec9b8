"""Which TensorRT is here and whether this project can use it: shared by engines.build
(which builds plans) and the tensorrt backend (which loads them), torch-free.

Works with TensorRT 8.6 (JetPack 6) through 10.x; 11 (strongly typed only) and older
than 8.6 are refused in one line by `available()`. `register_plugins()` must run
before any ONNX parse or plan deserialize (a plan built on 8.6 without the native
InstanceNormalization flag contains a plugin).
"""

from __future__ import annotations

import functools
from typing import Any


def trt_module() -> Any:
    """The real tensorrt module, or ImportError (type stubs alone are not TensorRT)."""
    import tensorrt

    if not hasattr(tensorrt, "Runtime"):  # e.g. only `tensorrt-stubs` installed
        raise ImportError("tensorrt is installed as type stubs only")
    return tensorrt


SUPPORTED = ((8, 6), (11, 0))  # [from, to): the APIs our TensorRT code is written against


def unsupported(version: str) -> str | None:
    """Why this TensorRT version cannot be used (one line), or None. 11 dropped weakly
    typed networks (no BuilderFlag.FP16) and device_memory_size: not supported yet."""
    try:
        got = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"TensorRT {version!r}: cannot read its version"
    if not SUPPORTED[0] <= got < SUPPORTED[1]:
        return (f"TensorRT {version} is not supported (8.6 to 10.x): install "
                f"'tensorrt-cu12>=10.0,<11' (pip install '.[tensorrt]'; on Jetson, JetPack 6's "
                f"own 8.6 or 10.3)")
    return None


def available() -> str | None:
    """None when TensorRT and cuda-python are usable here, else why not (one line)."""
    try:
        trt = trt_module()
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt; JetPack ships it)"
    why = unsupported(str(getattr(trt, "__version__", "?")))
    if why:
        return why
    try:
        from runtime.cuda import runtime_module

        runtime_module()
    except ImportError:
        return "cuda-python is not installed (pip install cuda-python)"
    return None


def trt_version() -> str:
    return str(getattr(trt_module(), "__version__", "unknown"))


@functools.lru_cache(maxsize=1)
def register_plugins() -> Any:
    """Register TensorRT's plugins once per process (init_libnvinfer_plugins) with a
    logger that lives as long as the process: the plugin library keeps a raw pointer to
    it. Before parsing (builder) and before any deserialize (runtime), as Polygraphy and
    NVIDIA's demo do."""
    trt = trt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    return logger

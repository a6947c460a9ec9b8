"""Torch-free Stable Diffusion runtime.

Public surface: `Pipeline` (load once, call many times), `generate(...)` (one shot)
and the CLI `python -m runtime.generate`. Imported lazily so that stages which only
need `runtime.bundle` do not pay for onnxruntime.
"""

__all__ = ["Pipeline", "generate"]


def __getattr__(name: str):
    if name in __all__:
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")

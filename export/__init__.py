"""Export stage: torch + diffusers + transformers -> an ONNX bundle (see runtime/bundle.py).

CLI:  python -m export --model {demo|sd14-random|DIR|FILE.safetensors|hub-id} --out DIR
                       [--opset 17] [--no-safety-checker] [--force] [--allow-pickle] [--seed 0]

Python API (imported lazily, so `import export` does not import torch):

    build_components(name: str | ModelConfig, seed: int = 0, safety: bool = True) -> Components
        "demo" (trained weights, export/demo_model/) / "sd14-random" (random) modules (export/components.py)
    load_components(model: str, *, allow_pickle=False, safety=True, seed=0) -> Components
        anything --model accepts (export/sources.py)
    export_bundle(components, out_dir, *, opset=17, external_data_threshold=2**31,
                  safety=True, force=False, profile=None, log=print) -> Path
        write the bundle atomically (export/bundle_writer.py)

Files: configs.py (model configs as data), components.py (torch modules), graphs.py
(per-graph wrappers, torch.onnx.export, ORT check), bundle_writer.py, sources.py
(model loading), checks.py (torch-free argument checks), tokenizer_files.py,
clip_vocab.py (CLIP's BPE vocabulary), cli.py.
"""

_LAZY = {"build_components": "export.components", "Components": "export.components",
         "load_components": "export.sources", "export_bundle": "export.bundle_writer",
         "ExportError": "export.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")

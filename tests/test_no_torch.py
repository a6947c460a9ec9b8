"""The runtime runs with torch, diffusers and transformers unimportable."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    class Block:
        banned = ("torch", "diffusers", "transformers")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.banned:
                raise ImportError(f"runtime imported {name}")
            return None

    sys.meta_path.insert(0, Block())
    for m in list(sys.modules):
        if m.split(".")[0] in Block.banned:
            del sys.modules[m]

    import importlib, pkgutil
    import runtime
    for m in pkgutil.walk_packages(runtime.__path__, "runtime."):
        importlib.import_module(m.name)  # the tensorrt backend imports tensorrt lazily
    from runtime import Pipeline
    with Pipeline("demo", "ort-cpu") as pipe:
        r = pipe("a photo of an astronaut riding a horse on mars", steps=3, seed=0)
    assert r.images.dtype.name == "uint8" and r.images.ndim == 4, r.images.shape
    assert not [m for m in sys.modules if m.split(".")[0] in Block.banned]
    print("ok", r.images.shape)
""")


def test_runtime_imports_and_generates_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_engines_stage_imports_no_runtime_backend():
    """engines/ shares only the torch-free modules with the runtime (DESIGN.md): the
    bundle, the cache (keys, plan search), file helpers, one-line argument errors, the
    CUDA wrapper and TensorRT's checks."""
    import ast
    from pathlib import Path

    shared = {"runtime.args", "runtime.bundle", "runtime.cache", "runtime.cuda", "runtime.files",
              "runtime.tensorrt_env", "runtime.cache_prune", "runtime.integrity"}
    used = set()
    for f in (Path(__file__).parent.parent / "engines").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "runtime":  # from runtime import cache
                used.update(f"runtime.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used.update(a.name for a in node.names)
    runtime_modules = {m for m in used if m.split(".")[0] == "runtime"}
    assert runtime_modules <= shared, runtime_modules - shared

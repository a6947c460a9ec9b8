"""Checks that stand in for a GPU: mypy of the TensorRT code against `tensorrt-stubs`,
and vermin for Python 3.10 (JetPack 6's Python) on runtime/ and engines/.

tensorrt-stubs cannot be a normal dependency: it requires the `tensorrt` package,
whose PyPI wheel downloads from pypi.nvidia.com. Install it without dependencies,
e.g. `pip install --no-deps --target .venv/typing-stubs tensorrt-stubs` (found there
automatically) or anywhere named by $SDRT_TRT_STUBS. Its 10.13 stubs have a few syntax
errors (parameters named `in`, a non-default after defaults); this test patches a copy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRT_FILES = ["runtime/backends/tensorrt.py", "runtime/backends/tensorrt_cached.py",
             "runtime/cuda.py", "runtime/tensorrt_env.py", "runtime/cache.py", "engines"]
MYPY_INI = """\
[mypy]
python_version = 3.10
ignore_missing_imports = True
follow_imports = silent
check_untyped_defs = True
[mypy-tensorrt.*]
ignore_errors = True
[mypy-tensorrt_bindings.*]
ignore_errors = True
"""


# Pinned so CI checks against the same stubs and bindings every run.
STUB_PACKAGES = ["tensorrt-stubs==10.13.0.35.1", "cuda-python==12.9.4", "cuda-bindings==12.9.4",
                 "cuda-pathfinder==1.9.1"]
LOCAL_STUBS = ROOT / ".typing-stubs"  # git-ignored


def _install_stubs() -> Path | None:
    """pip-install the stubs (no deps: their `tensorrt` dependency cannot install) into
    LOCAL_STUBS once, so a fresh clone and CI run these checks instead of skipping."""
    if (LOCAL_STUBS / "tensorrt_bindings").is_dir():
        return LOCAL_STUBS
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(LOCAL_STUBS), *STUB_PACKAGES], capture_output=True, text=True,
                       timeout=300)
    return LOCAL_STUBS if r.returncode == 0 else None


def _stub_dir() -> Path | None:
    candidates = [os.environ.get("SDRT_TRT_STUBS"), str(Path(sys.prefix) / "typing-stubs"),
                  str(LOCAL_STUBS), *sys.path]
    for c in filter(None, candidates):
        if (Path(c) / "tensorrt" / "__init__.pyi").is_file() and (
                Path(c) / "tensorrt_bindings").is_dir():
            return Path(c)
    return None


def _patched_stubs(src: Path, dst: Path) -> Path:
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(src / pkg, dst / pkg)
    for pyi in (dst / "tensorrt_bindings").glob("*.pyi"):
        text = re.sub(r"([(, ])in: ", r"\1in_: ", pyi.read_text())
        text = text.replace("power: Weights = None, channel_axis: int)",
                            "power: Weights = None, channel_axis: int = ...)")
        pyi.write_text(text)
    return dst


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_against_tensorrt_stubs(tmp_path):
    src = _stub_dir() or _install_stubs()
    if src is None:
        pytest.skip("tensorrt-stubs not found (pip install --no-deps --target "
                    ".venv/typing-stubs tensorrt-stubs, or set SDRT_TRT_STUBS)")
    stubs = _patched_stubs(src, tmp_path / "stubs")
    (tmp_path / "mypy.ini").write_text(MYPY_INI)
    env = {**os.environ, "MYPYPATH": str(stubs)}
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
                        "--cache-dir", str(ROOT / ".mypy_cache"), *TRT_FILES],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the stubs really were used: a wrong TensorRT call must fail
    bad = tmp_path / "bad.py"
    bad.write_text("import tensorrt as trt\n"
                   "def f(e: trt.ICudaEngine) -> None:\n"
                   "    e.create_execution_context_v9()\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
                        "--cache-dir", str(ROOT / ".mypy_cache"), str(bad)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "create_execution_context_v9" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("vermin") is None, reason="vermin is not installed")
def test_python_310_compatible():
    vermin = "import sys, vermin; sys.exit(vermin.main())"
    r = subprocess.run([sys.executable, "-c", vermin, "-t=3.10-", "--no-tips", "--violations",
                        "--eval-annotations", "runtime", "engines"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _cuda_python_dir() -> Path | None:
    if importlib.util.find_spec("cuda") is not None:
        return None  # importable as is: no extra path needed
    for c in filter(None, [os.environ.get("SDRT_CUDA_PYTHON"),
                           str(Path(sys.prefix) / "typing-stubs"), str(LOCAL_STUBS)]):
        if (Path(c) / "cuda" / "bindings").is_dir():
            return Path(c)
    return None


CUDA_CHECK = r"""
import re, sys
from pathlib import Path
from runtime import cuda
rt = cuda.runtime_module()
src = Path(cuda.__file__).read_text()
calls = set(re.findall(r'self\.call\("(\w+)"', src))
attrs = set(re.findall(r'self\.rt\.(\w+)\.(\w+)', src))
missing = [c for c in sorted(calls) if not hasattr(rt, c)]
missing += [f"{a}.{b}" for a, b in sorted(attrs) if not hasattr(getattr(rt, a, None), b)]
assert not missing, missing
assert len(calls) >= 15, calls
assert cuda.stream_handle(rt.cudaStream_t()) == 0  # int() of a cudaStream_t works
try:
    print(cuda.Cuda().device_info())  # a GPU machine
except cuda.CudaError as e:
    assert str(e).startswith("cudaGetDevice failed: cudaError"), e
    print("no GPU:", e)
"""


def test_cuda_python_has_every_call_we_make():
    """Against the real cuda-python (12.x or 13.x) where installed: every runtime
    function and enum the helper uses exists, and its errors are checked."""
    extra = _cuda_python_dir()
    if extra is None and importlib.util.find_spec("cuda") is None and _install_stubs():
        extra = _cuda_python_dir()
    if extra is None and importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-python not found (pip install --no-deps --target .venv/typing-stubs "
                    "cuda-python cuda-bindings cuda-pathfinder, or set SDRT_CUDA_PYTHON)")
    env = dict(os.environ)
    if extra is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", CUDA_CHECK], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

"""`python -m engines.build --backend tensorrt` against fake tensorrt / cuda modules, and
its one-line exit 2 where TensorRT is missing (the real situation on this machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fakes.gpu import FakeGPU
from fakes.tiny_bundle import make_bundle

from engines.build import main
from runtime import cache
from runtime.backends.tensorrt import TensorRTDevice, TensorRTEngine
from runtime.bundle import read_manifest
from runtime.cache import find_plan
from runtime.cuda import Cuda


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def build(bundle, cache_dir, *flags):
    return main([str(bundle), "--backend", "tensorrt", "--cache-dir", str(cache_dir), *flags])


def test_without_tensorrt_one_line_exit_2(bundle, tmp_path):
    """The real environment: no tensorrt module at all."""
    r = subprocess.run([sys.executable, "-m", "engines.build", str(bundle), "--backend",
                        "tensorrt", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "TensorRT is not installed" in r.stderr
    assert not list(tmp_path.iterdir())


def test_stubs_only_is_not_tensorrt(bundle, tmp_path, monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert build(bundle, tmp_path) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("flags,error", [
    (["--min", "1x100x100"], "multiples of 8"),
    (["--max", "big"], "BATCHxHEIGHTxWIDTH"),
    (["--graphs", "unet,refiner"], "refiner not in the bundle"),
    (["--workspace-gb", "0"], "must be positive"),
    (["--max-size", "100"], "--max-size must be a multiple of 8 in [8, 8192]"),
    (["--max-size", "96"], "--max-size 96 is below the model's default size 128x128"),
    (["--min-size", "256", "--max-size", "192"], "--min-size 256 is larger than --max-size 192"),
    (["--max-batch", "0"], "--max-batch must be an integer in [1, 64]"),
    (["--static", "--max-size", "256"], "--static builds one shape, given by --opt"),
    (["--max", "2x96x96"], "leaves out the bundle's default size 128x128"),
])
def test_bad_flags_one_line_exit_2(bundle, tmp_path, capsys, flags, error):
    assert build(bundle, tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1


def test_size_flags_widen_the_profile_and_keep_opt_inside(bundle, tmp_path, monkeypatch):
    """--min-size/--max-size/--max-batch as export's; --max below the manifest's opt
    moves opt inside instead of failing."""
    from engines.build import choose_profiles

    m = read_manifest(bundle)  # profile 64..256 px, opt 128, batch 1..2
    wide, _ = choose_profiles(m, False, None, None, None, (32, 512, 4))
    assert (wide.height, wide.batch) == ((32, 128, 512), (1, 1, 4))
    narrow, _ = choose_profiles(m, False, None, None, "1x128x128")
    assert narrow.height == (64, 128, 128) and narrow.batch == (1, 1, 1)
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "unet", "--max-size", "512", "--max-batch", "4") == 0
    assert gpu.builds[0]["profile"]["sample"]["max"] == [8, 4, 64, 64]  # 2B with guidance


def test_missing_bundle_exit_2(tmp_path, capsys):
    assert build(tmp_path / "nope", tmp_path) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("version,flags", [("10.3.0", 0), ("8.6.1", 1)])
def test_dynamic_build_then_cached(bundle, tmp_path, monkeypatch, capsys, version, flags):
    gpu = FakeGPU(trt_version=version).install(monkeypatch)
    assert build(bundle, tmp_path, "--workspace-gb", "2", "--opt-level", "4") == 0
    out = capsys.readouterr().out
    assert "[2/4] unet: done in" in out and f"TensorRT {version} on Fake H100" in out
    assert [b["graph"] for b in gpu.builds] == ["text_encoder", "unet", "vae_decoder",
                                                "safety_checker"]
    manifest = read_manifest(bundle)
    for b in gpu.builds:
        assert b["flags"] == ["FP16"] and b["pool"] == {"WORKSPACE": 2 << 30}
        assert b["opt_level"] == 4
        want = manifest.profile.shapes(manifest.graphs[b["graph"]].spec)
        want.pop("timestep", None)  # fixed [1]: no profile row
        assert b["profile"] == want
    assert {c[1] for c in gpu.calls("create_network")} == {flags}  # explicit batch on 8.6
    unet_parse = [c[1] for c in gpu.calls("parse_from_file") if c[1].endswith("unet.onnx")]
    assert unet_parse == [str(bundle / "unet.onnx")]  # by path: external data resolves

    timing = list((tmp_path / "tensorrt").glob("timing-Fake-H100-132-SMs-sm9.0-trt*.cache"))
    assert len(timing) == 1 and len(json.loads(timing[0].read_bytes())["entries"]) == 4  # per graph

    # second run with the same options: everything cached (other options: another plan)
    assert build(bundle, tmp_path, "--workspace-gb", "2", "--opt-level", "4") == 0
    assert capsys.readouterr().out.count("cached ->") == 4 and len(gpu.builds) == 4


def test_static_refit_and_other_gpu(bundle, tmp_path, monkeypatch, capsys):
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--static", "--refit", "--graphs", "unet") == 0
    (b,) = gpu.builds
    assert b["flags"] == ["FP16", "REFIT"]
    # batch 1 at the manifest's default 128x128, UNet batch 2 for guidance
    assert b["profile"]["sample"] == {"min": [2, 4, 16, 16], "opt": [2, 4, 16, 16],
                                      "max": [2, 4, 16, 16]}
    assert build(bundle, tmp_path, "--static", "--refit", "--graphs", "unet",
                 "--no-build") == 0
    other = FakeGPU(device=("Orin", "8.7")).install(monkeypatch)  # same cache, other GPU
    capsys.readouterr()
    assert build(bundle, tmp_path, "--static", "--graphs", "unet", "--no-build") == 2
    captured = capsys.readouterr()
    assert "not built for this machine" in captured.out and "Orin" in captured.out
    assert "--no-build" in captured.err
    assert build(bundle, tmp_path, "--static", "--graphs", "unet") == 0
    assert len(other.builds) == 1  # rebuilt for the Orin, the H100 plan untouched
    assert len(list((tmp_path / "tensorrt").glob("unet-*/unet.plan"))) == 2


def test_corrupt_plan_is_rebuilt_with_warning(bundle, tmp_path, monkeypatch, capsys):
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "vae_decoder") == 0
    (plan,) = (tmp_path / "tensorrt").glob("vae_decoder-*/vae_decoder.plan")
    plan.write_bytes(plan.read_bytes()[:10])
    capsys.readouterr()
    assert build(bundle, tmp_path, "--graphs", "vae_decoder") == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "truncated" in captured.err
    assert "done in" in captured.out and len(gpu.builds) == 2
    assert json.loads(plan.read_bytes())["graph"] == "vae_decoder"


def test_built_plans_run_through_the_backend(bundle, tmp_path, monkeypatch):
    """engines.build -> cache -> find_plan -> TensorRTEngine, all through the fakes."""
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "unet") == 0
    manifest = read_manifest(bundle)
    entry = manifest.graphs["unet"]
    shapes = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)}
    device = TensorRTDevice(Cuda(gpu.cudart))
    path = find_plan(entry, shapes, gpu.trt_version, device.info, tmp_path)
    assert path is not None and path.parent.parent == tmp_path / "tensorrt"
    with TensorRTEngine(entry.spec, path, device) as unet:
        unet.load()
        unet.allocate(shapes)
        unet.set_constant("encoder_hidden_states", np.zeros(shapes["encoder_hidden_states"],
                                                            np.float32))
        x = np.ones(shapes["sample"], np.float32)
        out = unet.run({"sample": x, "timestep": np.array([2.0], np.float32)})
        np.testing.assert_allclose(out["noise_pred"], 2 * x)
    device.release()
    assert gpu.device_mem == {}


def test_plan_key_is_the_one_cache_lookup_uses(bundle, tmp_path, monkeypatch):
    FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "text_encoder") == 0
    (key,) = [k for k, _ in cache.entries("tensorrt", "text_encoder", tmp_path)]
    manifest = read_manifest(bundle)
    assert key.graph_sha256 == cache.graph_sha256(manifest.graphs["text_encoder"])
    assert (key.device, key.capability, key.backend_version) == ("Fake H100, 132 SMs", "9.0", "10.3.0")


def test_static_keeps_text_encoder_dynamic(bundle, tmp_path, monkeypatch):
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--static", "--opt", "1x64x64",
                 "--graphs", "text_encoder,vae_decoder") == 0
    text, vae = gpu.builds
    # prompts + negative prompts in one call: 2B texts at opt/max (batch 1..2 here)
    assert text["profile"]["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [4, 77]}
    assert vae["profile"]["latent"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8],
                                        "max": [1, 4, 8, 8]}


def test_cached_engine_picks_and_swaps_plans(bundle, tmp_path, monkeypatch):
    """CachedTensorRTEngine: the static plan for its exact shapes, the dynamic one
    otherwise, and a clear error when no plan covers the shapes."""
    from runtime.backends.tensorrt_cached import CachedTensorRTEngine
    from runtime.engine import EngineError

    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "unet") == 0  # dynamic 64..256 px
    assert build(bundle, tmp_path, "--graphs", "unet", "--static") == 0  # 128 px
    manifest = read_manifest(bundle)
    device = TensorRTDevice(Cuda(gpu.cudart))
    e = CachedTensorRTEngine(manifest.graphs["unet"], manifest.profile, device, tmp_path,
                             cuda_graph=True)
    e.load()
    static_plan = e.path
    assert json.loads(static_plan.read_bytes())["profile"]["sample"]["max"] == [2, 4, 16, 16]

    def step(hw):
        shapes = {"sample": (2, 4, hw, hw), "timestep": (1,),
                  "encoder_hidden_states": (2, 77, 8)}
        e.allocate(shapes)
        e.set_constant("encoder_hidden_states", np.zeros(shapes["encoder_hidden_states"],
                                                         np.float32))
        x = np.ones(shapes["sample"], np.float32)
        np.testing.assert_allclose(
            e.run({"sample": x, "timestep": np.array([3.0], np.float32)})["noise_pred"], 3 * x)

    step(16)
    assert e.path == static_plan and len(gpu.calls("deserialize_cuda_engine")) == 1
    step(24)  # 192 px: only the dynamic plan covers it
    assert e.path != static_plan and len(gpu.calls("deserialize_cuda_engine")) == 2
    step(16)  # back to the static plan: kept deserialized, not read again
    assert e.path == static_plan and len(gpu.calls("deserialize_cuda_engine")) == 2
    assert {type(d).__name__ for d in gpu.deserialized} == {"mmap"}  # mapped, not copied
    with pytest.raises(EngineError, match=r"no TensorRT 10.3.0 plan .* engines.build"):
        step(40)  # 320 px > the profile's 256
    shutil.rmtree(static_plan.parent)  # pruned by another process while parked in memory
    step(24)
    step(16)  # still in memory: used, not looked for again
    assert e.path == static_plan and len(gpu.calls("deserialize_cuda_engine")) == 2
    step(24)
    e.parked.clear()  # dropped from memory too: found again, the dynamic plan covers it
    step(16)
    assert e.path != static_plan
    e.release()
    device.release()
    assert gpu.device_mem == {}


# --- issue 17 -------------------------------------------------------------------------

def _plans(cache_dir, graph):
    return [json.loads(p.read_bytes()) for p in (cache_dir / "tensorrt").glob(f"{graph}-*/{graph}.plan")]


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_demo_bundle_with_instancenorm_builds_without_plugins(tmp_path, monkeypatch, version):
    """The shipped demo (a real torch export: InstanceNormalization for every GroupNorm)
    parses on 8.6 only with the native flag or the registered plugin; with the flag set
    the plans carry no plugin, so they need none where they run."""
    gpu = FakeGPU(trt_version=version).install(monkeypatch)
    assert main(["demo", "--backend", "tensorrt", "--cache-dir", str(tmp_path),
                 "--graphs", "unet,vae_decoder"]) == 0
    assert [p["plugins"] for p in _plans(tmp_path, "unet") + _plans(tmp_path, "vae_decoder")] == [[], []]
    assert gpu.calls("init_libnvinfer_plugins")


def test_tensorrt_11_build_is_refused_in_one_line(bundle, tmp_path, monkeypatch, capsys):
    FakeGPU(trt_version="11.0.0").install(monkeypatch)
    assert build(bundle, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not supported" in err and "<11" in err


@pytest.mark.parametrize("damage", ["garbage", "other-gpu", "unwritable"])
def test_timing_cache_trouble_never_loses_the_plan(bundle, tmp_path, monkeypatch, capsys, damage):
    """A corrupt or foreign timing cache is replaced, an unwritable one skipped: the
    plan is built and cached either way, with one warning."""
    gpu = FakeGPU().install(monkeypatch)
    timing = tmp_path / "timing.cache"
    if damage == "garbage":
        timing.write_bytes(b"\x00not a timing cache")
    elif damage == "other-gpu":
        timing.write_bytes(json.dumps({"gpu": "Orin", "entries": ["x"]}).encode())
    else:
        blocker = tmp_path / "file"
        blocker.write_text("")
        timing = blocker / "timing.cache"  # its folder is a file
    assert build(bundle, tmp_path, "--graphs", "vae_decoder", "--timing-cache", str(timing)) == 0
    assert len(_plans(tmp_path, "vae_decoder")) == 1 and len(gpu.builds) == 1
    assert "warning: timing cache" in capsys.readouterr().err
    if damage != "unwritable":  # replaced by a valid cache of this GPU
        assert json.loads(timing.read_bytes()) == {"gpu": "Fake H100",
                                                   "entries": ["vae_decoder-tactics"]}


def test_other_build_options_build_another_plan(bundle, tmp_path, monkeypatch, capsys):
    """--refit / --opt-level / --workspace-gb after a default build build what was asked
    (they used to report "cached"); the runtime prefers the plan that is not refittable."""
    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "unet") == 0
    for flags in (["--refit"], ["--opt-level", "2"], ["--workspace-gb", "1"]):
        capsys.readouterr()
        assert build(bundle, tmp_path, "--graphs", "unet", *flags) == 0
        assert "done in" in capsys.readouterr().out, flags
    assert len(gpu.builds) == 4 and gpu.builds[1]["flags"] == ["FP16", "REFIT"]
    assert build(bundle, tmp_path, "--graphs", "unet", "--refit", "--no-build") == 0
    manifest = read_manifest(bundle)
    shapes = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)}
    device = TensorRTDevice(Cuda(gpu.cudart))
    path = find_plan(manifest.graphs["unet"], shapes, gpu.trt_version, device.info, tmp_path)
    assert "refit" not in json.loads((path.parent / cache.SIDECAR).read_text())["key"]["options"]
    device.release()


def test_cached_engine_loads_with_only_static_plans_for_other_shapes(bundle, tmp_path, monkeypatch):
    """load() used to demand a plan covering the manifest's opt shapes; a cache holding
    only a --static plan for another size now loads, and allocate() uses that plan."""
    from runtime.backends.tensorrt_cached import CachedTensorRTEngine

    gpu = FakeGPU().install(monkeypatch)
    assert build(bundle, tmp_path, "--graphs", "unet", "--static", "--opt", "1x64x64") == 0
    manifest = read_manifest(bundle)
    device = TensorRTDevice(Cuda(gpu.cudart))
    with CachedTensorRTEngine(manifest.graphs["unet"], manifest.profile, device, tmp_path) as e:
        e.load()
        shapes = {"sample": (2, 4, 8, 8), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)}
        e.allocate(shapes)
        e.set_constant("encoder_hidden_states", np.zeros((2, 77, 8), np.float32))
        x = np.ones(shapes["sample"], np.float32)
        np.testing.assert_allclose(
            e.run({"sample": x, "timestep": np.array([2.0], np.float32)})["noise_pred"], 2 * x)
    device.release()

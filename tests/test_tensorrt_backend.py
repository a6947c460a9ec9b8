"""TensorRTEngine against fake tensorrt / cuda-python modules (tests/fakes/gpu.py).

No GPU here: these prove the call order and the buffer discipline, for TensorRT 10
and 8.6 APIs; tests/test_tensorrt_gpu.py runs the real thing where there is one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes.gpu import FakeGPU

from runtime import cache
from runtime.backends.tensorrt import TensorRTDevice, TensorRTEngine
from runtime.bundle import GraphEntry, Profile, graph_spec
from runtime.cache import find_plan
from runtime.cache import tensorrt_key as plan_key
from runtime.cuda import Cuda
from runtime.engine import EngineError, SpecMismatch
from runtime.tensorrt_env import available

HIDDEN = 8
SPEC = graph_spec("unet", HIDDEN)
PROFILE = Profile((1, 1, 2), (64, 128, 256), (64, 128, 256)).shapes(SPEC)
SHAPES = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, HIDDEN)}


def write_plan(folder, graph="unet", scratch=1 << 20, profile=None, plugins=()):
    spec = graph_spec(graph, HIDDEN)
    plan = {"graph": graph, "hidden": HIDDEN, "scratch": scratch, "plugins": list(plugins),
            "profile": profile or Profile((1, 1, 2), (64, 128, 256), (64, 128, 256)).shapes(spec)}
    path = folder / f"{graph}.plan"
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture(params=["10.3.0", "10.0.1", "8.6.1"])
def gpu(request, monkeypatch):
    return FakeGPU(trt_version=request.param).install(monkeypatch)


def make_engine(gpu, tmp_path, cuda_graph=False, device=None, **plan):
    device = device or TensorRTDevice(Cuda(gpu.cudart))
    return TensorRTEngine(SPEC, write_plan(tmp_path, **plan), device, cuda_graph=cuda_graph)


def feeds(seed=0, t=3.0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal(SHAPES["sample"]).astype(np.float32),
            "timestep": np.array([t], np.float32)}


EHS = np.full(SHAPES["encoder_hidden_states"], 0.5, np.float32)


def test_stubs_alone_are_not_tensorrt(monkeypatch):
    import types

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", types.ModuleType("tensorrt"))
    assert "not installed" in available()


def test_lifecycle_and_results(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    f = feeds()
    out = e.run(f)
    np.testing.assert_allclose(out["noise_pred"], f["sample"] * 3.0 + 0.5, rtol=1e-6)
    e.release()
    e.device.release()
    assert gpu.device_mem == {} and gpu.host_mem == {}  # everything freed


def test_context_api_matches_version(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    e.run(feeds())
    if gpu.trt >= (10, 1):
        assert gpu.calls("create_execution_context") == [
            ("create_execution_context", "USER_MANAGED")]
        assert [c[2] for c in gpu.calls("set_device_memory")] == [1 << 20]  # with its size
    elif gpu.trt >= (10, 0):  # allocation strategies, but still the v1 memory API
        assert gpu.calls("create_execution_context") == [
            ("create_execution_context", "USER_MANAGED")]
        assert len(gpu.calls("device_memory=")) == 1
    else:
        assert gpu.calls("create_execution_context_without_device_memory")
        assert len(gpu.calls("device_memory=")) == 1


def test_shapes_before_addresses_and_every_tensor_bound(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.load()
    e.allocate(SHAPES)
    names = [c[0] for c in gpu.log]
    last_shape = max(i for i, n in enumerate(names) if n == "set_input_shape")
    first_addr = min(i for i, n in enumerate(names) if n == "set_tensor_address")
    assert last_shape < first_addr
    assert {c[1] for c in gpu.calls("set_input_shape")} == {t.name for t in SPEC.inputs}
    bound = {c[1] for c in gpu.calls("set_tensor_address")}
    assert bound == {t.name for t in (*SPEC.inputs, *SPEC.outputs)}


def test_copies_execute_and_one_sync_per_run(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    start = len(gpu.log)
    e.run(feeds())
    step = [c[:2] for c in gpu.log[start:] if c[0] in (
        "cudaMemcpyAsync", "execute_async_v3", "cudaStreamSynchronize")]
    assert [s[0] for s in step] == ["cudaMemcpyAsync", "cudaMemcpyAsync", "execute_async_v3",
                                    "cudaMemcpyAsync", "cudaStreamSynchronize"]
    assert [s[1] for s in step if s[0] == "cudaMemcpyAsync"] == [
        "HostToDevice", "HostToDevice", "DeviceToHost"]  # sample, timestep in; noise_pred out


def test_buffers_reused_across_steps(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    first = e.run(feeds(0))["noise_pred"]
    mallocs = gpu.mallocs
    for i in range(5):
        out = e.run(feeds(i, t=float(i)))
        assert out["noise_pred"] is first  # aliases the same pinned buffer
    e.allocate(dict(SHAPES))  # same shapes: nothing happens
    assert gpu.mallocs == mallocs
    assert len(gpu.calls("set_input_shape")) == len(SPEC.inputs)


def test_cuda_graph_capture_replay_and_recapture(gpu, tmp_path):
    e = make_engine(gpu, tmp_path, cuda_graph=True)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    f = feeds(0)
    np.testing.assert_allclose(e.run(f)["noise_pred"], f["sample"] * 3 + 0.5, rtol=1e-6)
    assert len(gpu.calls("cudaStreamBeginCapture")) == 1
    executes = len(gpu.calls("execute_async_v3"))  # one plain run + one captured
    for i in range(3):  # replays see new inputs, TensorRT is not called again
        f = feeds(i + 1, t=float(i + 2))
        np.testing.assert_allclose(e.run(f)["noise_pred"], f["sample"] * (i + 2) + 0.5,
                                   rtol=1e-6)
    assert len(gpu.calls("execute_async_v3")) == executes
    assert len(gpu.calls("cudaGraphLaunch")) == 3

    bigger = {**SHAPES, "sample": (2, 4, 24, 24)}
    e.allocate(bigger)  # new shape: the old graph is destroyed ...
    assert len(gpu.calls("cudaGraphExecDestroy")) == 1
    e.set_constant("encoder_hidden_states", EHS)
    rng = np.random.default_rng(9)
    f = {"sample": rng.standard_normal(bigger["sample"]).astype(np.float32),
         "timestep": np.array([2.0], np.float32)}
    np.testing.assert_allclose(e.run(f)["noise_pred"], f["sample"] * 2 + 0.5, rtol=1e-6)
    assert len(gpu.calls("cudaStreamBeginCapture")) == 2  # ... and re-captured
    e.release()
    assert len(gpu.calls("cudaGraphExecDestroy")) == 2


def test_scratch_shared_and_sized_to_largest(gpu, tmp_path):
    device = TensorRTDevice(Cuda(gpu.cudart))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = make_engine(gpu, tmp_path / "a", device=device, scratch=1000)
    large = make_engine(gpu, tmp_path / "b", device=device, scratch=5000)
    small.load()
    large.load()
    for e in (small, large):
        e.allocate(SHAPES)
        e.set_constant("encoder_hidden_states", EHS)
        e.run(feeds())
    bound = gpu.calls("set_device_memory", "device_memory=")
    assert len(bound) == 2 and bound[0][1] == bound[1][1]  # one allocation for both
    assert gpu.device_mem[device.scratch_ptr].size == 5000


def test_scratch_growth_rebinds_and_drops_graph(gpu, tmp_path):
    device = TensorRTDevice(Cuda(gpu.cudart))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_engine(gpu, tmp_path / "a", device=device, cuda_graph=True, scratch=1000)
    first.load()
    first.allocate(SHAPES)
    first.set_constant("encoder_hidden_states", EHS)
    first.run(feeds())
    late = make_engine(gpu, tmp_path / "b", device=device, scratch=9000)
    late.load()  # loaded after `first` ran: the scratch must grow
    late.allocate(SHAPES)
    late.set_constant("encoder_hidden_states", EHS)
    late.run(feeds())
    f = feeds(3)
    np.testing.assert_allclose(first.run(f)["noise_pred"], f["sample"] * 3 + 0.5, rtol=1e-6)
    assert len(gpu.calls("cudaStreamBeginCapture")) == 2  # re-captured with the new scratch
    assert len(gpu.calls("set_device_memory", "device_memory=")) == 3


def test_errors_name_engine_and_shapes(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    with pytest.raises(EngineError, match="before allocate"):
        e.run(feeds())
    e.load()
    gpu.fail["cudaMalloc"] = "cudaErrorMemoryAllocation"
    with pytest.raises(EngineError) as err:
        e.allocate(SHAPES)
    msg = str(err.value)
    assert "'unet'" in msg and "cudaMalloc" in msg and "cudaErrorMemoryAllocation" in msg
    assert "(2, 4, 16, 16)" in msg
    gpu.fail.clear()
    with pytest.raises(EngineError, match=r"outside the plan's profile.*engines.build"):
        e.allocate({**SHAPES, "sample": (2, 4, 40, 40)})  # 320 px > 256
    e.allocate(SHAPES)
    with pytest.raises(EngineError, match="never given"):
        e.run(feeds())  # encoder_hidden_states was never set
    e.set_constant("encoder_hidden_states", EHS)
    with pytest.raises(EngineError, match=r"input sample is float64"):
        e.run({"sample": np.zeros(SHAPES["sample"]), "timestep": np.ones(1, np.float32)})
    gpu.fail_execute = True
    with pytest.raises(EngineError, match=r"execute_async_v3 failed at shapes"):
        e.run(feeds())


def test_corrupt_plan_is_refused(gpu, tmp_path):
    path = tmp_path / "unet.plan"
    path.write_bytes(b"\x00garbage")
    e = TensorRTEngine(SPEC, path, TensorRTDevice(Cuda(gpu.cudart)))
    with pytest.raises(EngineError, match="could not deserialize.*engines.build"):
        e.load()


def test_plan_of_another_graph_is_a_spec_mismatch(gpu, tmp_path):
    """Other I/O names than the spec's: SpecMismatch (a corrupt bundle under `auto`, which
    is reported, not fallen back from), as on ort and openvino."""
    path = write_plan(tmp_path, graph="vae_decoder")
    e = TensorRTEngine(SPEC, path, TensorRTDevice(Cuda(gpu.cudart)))
    with pytest.raises(SpecMismatch, match=r"plan inputs \['latent'\] do not match"):
        e.load()


def test_plan_for_another_gpu_is_refused(gpu, tmp_path):
    """A cached plan whose sidecar names another GPU/TensorRT is never loaded."""
    entry = GraphEntry(SPEC, "a" * 64)
    other = cache.CacheKey("unet", "a" * 64, "tensorrt", gpu.trt_version, "Orin", "8.7",
                           "fp16", cache.shapes_json(PROFILE))
    path = cache.store(other, lambda d: write_plan(d), tmp_path)
    e = TensorRTEngine(SPEC, path, TensorRTDevice(Cuda(gpu.cudart)))
    with pytest.raises(EngineError, match="built with TensorRT .* for Orin"):
        e.load()
    device = TensorRTDevice(Cuda(gpu.cudart)).info
    assert find_plan(entry, SHAPES, gpu.trt_version, device, tmp_path) is None


def test_find_plan_prefers_static_then_smallest_covering(gpu, tmp_path):
    entry = GraphEntry(SPEC, "a" * 64)
    info = TensorRTDevice(Cuda(gpu.cudart)).info
    big = Profile((1, 1, 4), (64, 128, 512), (64, 128, 512)).shapes(SPEC)
    for profile in (PROFILE, big):
        cache.store(plan_key(entry, profile, gpu.trt_version, info),
                    lambda d, p=profile: write_plan(d, profile=p), tmp_path)
    found = find_plan(entry, SHAPES, gpu.trt_version, info, tmp_path)
    assert found.parent.name == plan_key(entry, PROFILE, gpu.trt_version, info).dirname
    huge = {**SHAPES, "sample": (2, 4, 48, 48)}  # 384 px: only the big profile covers
    assert find_plan(entry, huge, gpu.trt_version, info, tmp_path).parent.name == \
        plan_key(entry, big, gpu.trt_version, info).dirname
    static = cache.static_profile(SPEC, SHAPES)
    cache.store(plan_key(entry, static, gpu.trt_version, info),
                lambda d: write_plan(d, profile=static), tmp_path)
    assert find_plan(entry, SHAPES, gpu.trt_version, info, tmp_path).parent.name == \
        plan_key(entry, static, gpu.trt_version, info).dirname
    assert find_plan(entry, SHAPES, "10.99.0", info, tmp_path) is None  # other TensorRT


def test_failed_capture_falls_back_to_plain_runs(gpu, tmp_path):
    e = make_engine(gpu, tmp_path, cuda_graph=True)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    gpu.fail["cudaGraphInstantiate"] = "cudaErrorStreamCaptureUnsupported"
    f = feeds(0)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = e.run(f)
    np.testing.assert_allclose(out["noise_pred"], f["sample"] * 3 + 0.5, rtol=1e-6)
    gpu.fail.clear()
    f = feeds(1, t=5.0)  # later runs execute directly and stay correct
    np.testing.assert_allclose(e.run(f)["noise_pred"], f["sample"] * 5 + 0.5, rtol=1e-6)
    assert not gpu.calls("cudaGraphLaunch") and len(gpu.calls("cudaStreamBeginCapture")) == 1
    e.release()


# --- issue 17: what a review against TensorRT 8.6/10.x found ----------------------------

def test_plugins_registered_before_a_plan_is_deserialized(gpu, tmp_path):
    """A plan that uses a TensorRT plugin (InstanceNormalization_TRT, from an 8.6 build
    without the native flag) deserializes only once the plugins are registered."""
    e = TensorRTEngine(SPEC, write_plan(tmp_path, plugins=["InstanceNormalization_TRT"]),
                       TensorRTDevice(Cuda(gpu.cudart)))
    e.load()
    names = [c[0] for c in gpu.log]
    assert names.index("init_libnvinfer_plugins") < names.index("deserialize_cuda_engine")


@pytest.mark.parametrize("version", ["11.0.0", "8.5.3"])
def test_unsupported_tensorrt_is_refused_with_one_line(monkeypatch, version):
    FakeGPU(trt_version=version).install(monkeypatch)
    why = available()
    assert why is not None and f"TensorRT {version} is not supported" in why
    assert "tensorrt-cu12>=10.0,<11" in why and "\n" not in why


def test_extras_pin_supported_tensorrt_and_cuda_python():
    import ast
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    extras = ast.literal_eval(re.search(r"^tensorrt = (\[.*\])$", text, re.M).group(1))
    # the CUDA 12 wheels by name: plain `tensorrt` resolves to the CUDA 13 build from 10.13.2
    assert sorted(extras) == ["cuda-python>=12,<13", "tensorrt-cu12>=10.0,<11"]


def test_zero_scratch_from_the_v2_api_is_used_as_is(monkeypatch, tmp_path):
    """10.1+: device_memory_size_v2 may be 0 (weight streaming, tiny graphs); the
    deprecated v1 size is not a fallback for it."""
    gpu = FakeGPU("10.3.0").install(monkeypatch)
    e = make_engine(gpu, tmp_path, scratch=0)
    e.load()
    assert e.scratch_bytes == 0


def test_an_empty_plan_file_is_one_clear_error(gpu, tmp_path):
    e = make_engine(gpu, tmp_path)
    e.path.write_bytes(b"")
    with pytest.raises(EngineError, match="cannot read plan"):
        e.load()


def test_capture_failure_clears_cudas_last_error(gpu, tmp_path):
    """The failed capture's error must not stay in cudart's last-error slot, where the
    next enqueue would find it and fail (the fakes' TensorRT checks it, as TensorRT does)."""
    e = make_engine(gpu, tmp_path, cuda_graph=True)
    e.load()
    e.allocate(SHAPES)
    e.set_constant("encoder_hidden_states", EHS)
    gpu.fail["cudaGraphInstantiate"] = "cudaErrorStreamCaptureUnsupported"
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        e.run(feeds(0))
    gpu.fail.clear()
    f = feeds(1, t=5.0)
    np.testing.assert_allclose(e.run(f)["noise_pred"], f["sample"] * 5 + 0.5, rtol=1e-6)
    assert gpu.calls("cudaGetLastError") and not gpu.refused

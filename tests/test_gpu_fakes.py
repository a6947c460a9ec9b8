"""The fake GPU (tests/fakes/gpu.py) is only worth what it refuses: each test here breaks
one rule of the real TensorRT / CUDA on purpose and checks that the fake refuses it as
the real thing would, so the backend tests built on it can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes.gpu import FakeGPU, _Err

from runtime.bundle import Profile, graph_spec

SPEC = graph_spec("unet", 8)
PLAN = {"graph": "unet", "hidden": 8, "scratch": 4096, "plugins": [],
        "profile": Profile((1, 1, 2), (64, 128, 256), (64, 128, 256)).shapes(SPEC)}
SHAPES = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)}


def ready_context(gpu: FakeGPU, scratch: int = 4096, skip_address: str | None = None):
    """A context with shapes, addresses and scratch set as the backend sets them."""
    trt = gpu.tensorrt
    engine = trt.Runtime(None).deserialize_cuda_engine(json.dumps(PLAN).encode())
    if gpu.trt >= (10, 0):
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    else:
        ctx = engine.create_execution_context_without_device_memory()
    rt = gpu.cudart
    for name, shape in SHAPES.items():
        assert ctx.set_input_shape(name, shape)
    for name in engine.names:
        if name != skip_address:
            shape = ctx.get_tensor_shape(name)
            ctx.set_tensor_address(name, rt.cudaMalloc(int(np.prod(shape)) * 4)[1])
    ptr = rt.cudaMalloc(scratch)[1]
    if hasattr(ctx, "set_device_memory"):
        ctx.set_device_memory(ptr, scratch)
    else:
        ctx.device_memory = ptr
    return engine, ctx


@pytest.fixture(params=["10.3.0", "10.0.1", "8.6.1"])
def gpu(request):
    return FakeGPU(request.param)


def test_a_ready_context_executes(gpu):
    _, ctx = ready_context(gpu)
    assert ctx.execute_async_v3(1) and gpu.executed == ["unet"]


def test_scratch_smaller_than_the_engine_needs_is_refused(gpu):
    _, ctx = ready_context(gpu, scratch=1)
    assert not ctx.execute_async_v3(1) and "needed" in gpu.refused[0]


def test_a_missing_tensor_address_is_refused(gpu):
    _, ctx = ready_context(gpu, skip_address="noise_pred")
    assert not ctx.execute_async_v3(1) and "noise_pred" in gpu.refused[0]


def test_a_pending_cuda_error_makes_the_next_enqueue_fail(gpu):
    _, ctx = ready_context(gpu)
    gpu.fail["cudaGraphInstantiate"] = "cudaErrorStreamCaptureUnsupported"
    gpu.cudart.cudaGraphInstantiate(None, 0)
    assert not ctx.execute_async_v3(1)
    assert gpu.cudart.cudaGetLastError()[0] is _Err.cudaErrorStreamCaptureUnsupported
    assert ctx.execute_async_v3(1)  # cleared


def test_capture_rules(gpu):
    rt = gpu.cudart
    assert rt.cudaStreamBeginCapture(0, None)[0] is _Err.cudaErrorStreamCaptureUnsupported
    stream = rt.cudaStreamCreate()[1]
    for unsafe in ("cudaMalloc", "cudaStreamSynchronize"):
        assert rt.cudaStreamBeginCapture(stream, None)[0] is _Err.cudaSuccess
        args = (16,) if unsafe == "cudaMalloc" else (stream,)
        assert getattr(rt, unsafe)(*args)[0] is _Err.cudaErrorStreamCaptureUnsupported
        assert rt.cudaStreamEndCapture(stream)[0] is _Err.cudaErrorStreamCaptureInvalidated


def test_a_replay_uses_the_buffers_it_captured(gpu):
    """Re-pointing a tensor after capture does not change what the graph reads or
    writes; freeing a captured buffer makes the replay an illegal address."""
    engine, ctx = ready_context(gpu)
    rt = gpu.cudart
    stream = rt.cudaStreamCreate()[1]
    rt.cudaStreamBeginCapture(stream, None)
    assert ctx.execute_async_v3(int(stream))
    graph = rt.cudaStreamEndCapture(stream)[1]
    exec_ = rt.cudaGraphInstantiate(graph, 0)[1]
    old = ctx.addresses["noise_pred"]
    new = rt.cudaMalloc(gpu.device_mem[old].size)[1]
    ctx.set_tensor_address("noise_pred", new)
    gpu.device_mem[ctx.addresses["sample"]].view(np.float32)[:] = 1.0  # noise_pred = 2 x 1
    gpu.device_mem[ctx.addresses["timestep"]].view(np.float32)[:] = 2.0
    assert rt.cudaGraphLaunch(exec_, stream)[0] is _Err.cudaSuccess
    assert not gpu.device_mem[new].any() and gpu.device_mem[old].any()  # stale output
    rt.cudaFree(old)
    assert rt.cudaGraphLaunch(exec_, stream)[0] is _Err.cudaErrorIllegalAddress


def test_instancenorm_needs_the_native_flag_or_plugins_on_86(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [2], [1.0, 1.0]) for n in ("s", "b")]
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])
    path = tmp_path / "norm.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "norm", [x], [y], inits)), str(path))
    for version, flag, plugins, parses, plugin_in_plan in (
            ("8.6.1", False, False, False, False), ("8.6.1", False, True, True, True),
            ("8.6.1", True, False, True, False), ("10.0.1", False, False, True, False)):
        gpu = FakeGPU(version)
        trt = gpu.tensorrt
        if plugins:
            trt.init_libnvinfer_plugins(None, "")
        network = trt.Builder(None).create_network(0)
        parser = trt.OnnxParser(network, None)
        if flag:
            parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
        assert parser.parse_from_file(str(path)) is parses, version
        assert ("InstanceNormalization_TRT" in network.plugins) is plugin_in_plan
        if not parses:
            assert "InstanceNormalization_TRT" in parser.get_error(0)


def test_a_plan_with_a_plugin_needs_the_plugins_registered():
    gpu = FakeGPU("8.6.1")
    data = json.dumps({**PLAN, "plugins": ["InstanceNormalization_TRT"]}).encode()
    assert gpu.tensorrt.Runtime(None).deserialize_cuda_engine(data) is None
    gpu.tensorrt.init_libnvinfer_plugins(None, "")
    assert gpu.tensorrt.Runtime(None).deserialize_cuda_engine(data) is not None


def test_timing_caches_refuse_garbage_and_other_gpus():
    gpu = FakeGPU()
    config = gpu.tensorrt.Builder(None).create_builder_config()
    assert config.create_timing_cache(b"\x00garbage") is None
    foreign = config.create_timing_cache(json.dumps({"gpu": "Orin", "entries": []}).encode())
    assert not config.set_timing_cache(foreign, False)
    mine = config.create_timing_cache(b"")
    assert config.set_timing_cache(mine, False) and not mine.combine(foreign, False)


def test_tensorrt_versions_have_their_own_apis():
    t11, t100, t86 = FakeGPU("11.0.0"), FakeGPU("10.0.1"), FakeGPU("8.6.1")
    assert not hasattr(t11.tensorrt.BuilderFlag, "FP16")  # strongly typed only
    assert hasattr(t86.tensorrt.BuilderFlag, "FP16")
    e11 = t11.tensorrt.Runtime(None).deserialize_cuda_engine(json.dumps(PLAN).encode())
    assert not hasattr(e11, "device_memory_size")
    e100 = t100.tensorrt.Runtime(None).deserialize_cuda_engine(json.dumps(PLAN).encode())
    assert not hasattr(e100, "device_memory_size_v2")
    ctx = e100.create_execution_context(t100.tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert not hasattr(ctx, "set_device_memory")  # 10.0: still context.device_memory
    assert not hasattr(t86.tensorrt, "ExecutionContextAllocationStrategy")


def test_refit_rules():
    """trt.Refitter as strict as TensorRT where a LoRA refit can go wrong: no refitter for
    a plan built without REFIT; a weight of another size or name is refused; weights fused
    with those set are missing and the refit fails until they are given; trt.Weights keeps
    only a pointer, so an array freed before refit_cuda_engine is caught."""
    import gc

    gpu = FakeGPU()
    trt = gpu.tensorrt
    plain = trt.Runtime(None).deserialize_cuda_engine(json.dumps(PLAN).encode())
    with pytest.raises(TypeError, match="REFIT"):
        trt.Refitter(plain, None)
    plan = {**PLAN, "refittable": True, "weights": {"w": [4, 0.0], "b": [2, 0.0]},
            "fused": [["w", "b"]]}
    engine = trt.Runtime(None).deserialize_cuda_engine(json.dumps(plan).encode())
    r = trt.Refitter(engine, None)
    assert not r.set_named_weights("w", trt.Weights(np.ones(3, np.float32)))  # another size
    assert not r.set_named_weights("nope", trt.Weights(np.ones(4, np.float32)))
    w = np.ones(4, np.float32)
    assert r.set_named_weights("w", trt.Weights(w))
    assert r.get_missing_weights() == ["b"] and not r.refit_cuda_engine()
    assert r.set_named_weights("b", trt.Weights(np.ones(2, np.float32)))  # freed at once
    gc.collect()
    with pytest.raises(AssertionError, match="freed"):
        r.refit_cuda_engine()
    b = np.ones(2, np.float32)
    assert r.set_named_weights("b", trt.Weights(b)) and r.refit_cuda_engine()
    assert engine.shift() == 6.0  # 4 + 2 ones over zeros

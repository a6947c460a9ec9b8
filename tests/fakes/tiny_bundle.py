"""A tiny bundle made with onnx.helper: the real graph names, I/O names, dtypes and
dynamic axes of runtime.bundle's specs, with a few ops each (no torch, < 1 s).

The UNet is saved with external data (unet.onnx.data), like the full-size one, so
every path that must resolve external data is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.bundle import GraphEntry, Manifest, Profile, graph_spec, sha256_file

HIDDEN = 8
CONCEPTS = 17
VOCAB = 49408
OPSET = 17
DTYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32, "bool": TensorProto.BOOL}


def _io(spec):  # value infos with named dynamic axes, straight from the spec
    def vi(t):
        return helper.make_tensor_value_info(t.name, DTYPES[t.dtype], list(t.shape))
    return [vi(t) for t in spec.inputs], [vi(t) for t in spec.outputs]


def _model(spec, nodes, inits) -> onnx.ModelProto:
    inputs, outputs = _io(spec)
    graph = helper.make_graph(nodes, spec.name, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def text_encoder(rng):
    spec = graph_spec("text_encoder", HIDDEN)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),  # [B, 77, C]
        helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["last_hidden_state"],
                         axis=-1),
    ]
    inits = {"emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
             "ln_w": np.ones(HIDDEN, np.float32), "ln_b": np.zeros(HIDDEN, np.float32)}
    return spec, _model(spec, nodes, inits)


def unet(rng):
    spec = graph_spec("unet", HIDDEN)
    nodes = [
        helper.make_node("Conv", ["sample", "conv_w", "conv_b"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["y", "timestep"], ["yt"]),  # [N, 4, h, w]
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["c"], axes=[1, 2],
                         keepdims=1),  # [N, 1, 1]
        helper.make_node("Unsqueeze", ["c", "axis3"], ["c4"]),  # [N, 1, 1, 1]
        helper.make_node("Add", ["yt", "c4"], ["noise_pred"]),
    ]
    inits = {"conv_w": (0.1 * rng.standard_normal((4, 4, 3, 3))).astype(np.float32),
             "conv_b": np.zeros(4, np.float32), "axis3": np.array([3], np.int64)}
    return spec, _model(spec, nodes, inits)


def vae_decoder(rng):
    spec = graph_spec("vae_decoder", HIDDEN)
    nodes = [
        helper.make_node("Resize", ["latent", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "conv_w", "conv_b"], ["z"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["z"], ["image"]),  # [B, 3, H, W] in [-1, 1]
    ]
    inits = {"scales": np.array([1, 1, 8, 8], np.float32),
             "conv_w": (0.1 * rng.standard_normal((3, 4, 3, 3))).astype(np.float32),
             "conv_b": np.zeros(3, np.float32)}
    return spec, _model(spec, nodes, inits)


def safety_checker(rng):
    spec = graph_spec("safety_checker", HIDDEN, CONCEPTS)
    nodes = [
        helper.make_node("GlobalAveragePool", ["clip_input"], ["p"]),  # [B, 3, 1, 1]
        helper.make_node("Flatten", ["p"], ["f"]),  # [B, 3]
        helper.make_node("MatMul", ["f", "proj"], ["cos"]),  # [B, K]
        helper.make_node("Sub", ["cos", "threshold"], ["concept_scores"]),  # [B, K], all < 0
        helper.make_node("ReduceMax", ["concept_scores"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["has_nsfw"]),  # [B] bool
        helper.make_node("MatMul", ["f", "special_proj"], ["special_scores"]),  # [B, 3]
    ]
    inits = {"proj": rng.standard_normal((3, CONCEPTS)).astype(np.float32),
             "threshold": np.array(100.0, np.float32), "zero": np.array(0.0, np.float32),
             "special_proj": np.full((3, 3), -100.0, np.float32)}  # never special care
    return spec, _model(spec, nodes, inits)


def make_bundle(folder: Path, seed: int = 0) -> Path:
    """Write a tiny valid bundle (manifest + 4 graphs) into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = {}
    for make in (text_encoder, unet, vae_decoder, safety_checker):
        spec, model = make(rng)
        path = folder / spec.file
        external = spec.name == "unet"
        if external:
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{spec.file}.data", size_threshold=64)
        else:
            onnx.save(model, str(path))
        data = f"{spec.file}.data" if external else None
        entries[spec.name] = GraphEntry(spec, sha256_file(path), data,
                                        sha256_file(folder / data) if data else None)
    Manifest(source={"model": "tiny-test", "hash": "0" * 64}, hidden=HIDDEN, graphs=entries,
             profile=Profile((1, 1, 2), (64, 128, 256), (64, 128, 256)),
             default_height=128, default_width=128, opset=OPSET).write(folder)
    return folder

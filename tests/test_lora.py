"""runtime.lora vs diffusers' load_lora_weights + fuse_lora on the demo model.

LoRA files are made with PEFT on the tiny demo UNet and text encoder (random A and B, rank 4,
conv1 rank 2, Linear, 1x1 and 3x3 convs) and saved the ways people have them: diffusers'
save_lora_weights with and without adapter metadata, kohya (convert_state_dict_to_kohya,
renamed to kohya-ss' own `lora_te_text_model_` spelling, alpha != rank), the older diffusers
attention-processor names, bf16 and fp16. Diffusers fuses each into a fresh copy of the
model; every parameter it changed must equal base + delta(layer, scale) from our reader,
and no other. Float32 throughout. Measured: max |error| 2.4e-7 with weights and deltas of
magnitude ~1 (1.6e-7 relative to the largest |fused weight|: float32 roundings, since
torch's matmul sums in another order than numpy's and we scale the rank-sized factor
where peft scales the product), 55 of 73 layers bit-exact at scale 1, none at 0.6; the
bound is 1e-6 relative.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from runtime.lora import LoraError, delta, read_lora  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv_shortcut"]  # Linear, 3x3 and 1x1 Conv2d
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RTOL = 1e-6
KOHYA_ALPHA = 2.0  # one alpha for every module, as kohya-ss writes (diffusers: see below)


def lora_params(unet, text_encoder) -> dict[str, dict[str, tuple[int, ...]]]:
    """The `params` read_lora wants, from torch modules (the runtime builds it from the bundle)."""
    return {c: {n: tuple(p.shape) for n, p in m.named_parameters()}
            for c, m in (("unet", unet), ("text_encoder", text_encoder))}


@pytest.fixture(scope="module")
def adapters(demo_components):
    """PEFT adapters on copies of the demo UNet and text encoder: their state dicts and
    LoraConfigs. rank_pattern / alpha_pattern give modules their own scaling, and the text
    encoder's is rsLoRA."""
    torch.manual_seed(0)
    unet, te = copy.deepcopy(demo_components.unet), copy.deepcopy(demo_components.text_encoder)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=UNET_TARGETS, rank_pattern={"conv1": 2},
                                     alpha_pattern={"ff.net.2": 3}))
    te.add_adapter(peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, use_rslora=True,
                                   target_modules=TE_TARGETS))  # scaling alpha / sqrt(r)
    return (peft.get_peft_model_state_dict(unet), peft.get_peft_model_state_dict(te),
            unet.peft_config["default"].to_dict(), te.peft_config["default"].to_dict())


@pytest.fixture(scope="module")
def files(adapters, tmp_path_factory) -> dict[str, Path]:
    """One LoRA file per layout diffusers reads."""
    unet_sd, te_sd, unet_cfg, te_cfg = adapters
    folder = tmp_path_factory.mktemp("loras")
    save = diffusers.StableDiffusionPipeline.save_lora_weights
    save(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
         weight_name="peft_meta.safetensors", unet_lora_adapter_metadata=unet_cfg,
         text_encoder_lora_adapter_metadata=te_cfg)
    save(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
         weight_name="peft.safetensors")
    plain = load_file(folder / "peft.safetensors")
    meta = dict(load_file_metadata(folder / "peft_meta.safetensors"))
    save_torch({k: v.bfloat16() for k, v in load_file(folder / "peft_meta.safetensors").items()},
               folder / "peft_bf16.safetensors", metadata=meta)
    save_torch({_old_name(k): v for k, v in plain.items()}, folder / "old.safetensors")

    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = {k.replace("lora_te1_", "lora_te_text_model_"): v  # kohya-ss' own spelling
             for k, v in convert_state_dict_to_kohya(plain).items()}
    kohya = {k: torch.tensor(KOHYA_ALPHA) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_torch(kohya, folder / "kohya.safetensors")
    save_torch({k: v.half() for k, v in kohya.items()}, folder / "kohya_fp16.safetensors")
    return {p.stem: p for p in folder.iterdir()}


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _old_name(key: str) -> str:
    """Today's PEFT key -> the older diffusers attention-processor one (the inverse of
    diffusers' UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT)."""
    key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    for new, old in ((".to_out.0.lora.", ".processor.to_out_lora."), (".to_q.lora.", ".processor.to_q_lora."),
                     (".to_k.lora.", ".processor.to_k_lora."), (".to_v.lora.", ".processor.to_v_lora."),
                     (".q_proj.lora.", ".to_q_lora."), (".k_proj.lora.", ".to_k_lora."),
                     (".v_proj.lora.", ".to_v_lora."), (".out_proj.lora.", ".to_out_lora."),
                     (".mlp.fc1.lora.", ".mlp.fc1.lora_linear_layer."),
                     (".mlp.fc2.lora.", ".mlp.fc2.lora_linear_layer.")):
        key = key.replace(new, old)
    return key


def fused_by_diffusers(components, path: Path, scale: float) -> dict[str, dict[str, np.ndarray]]:
    """load_lora_weights + fuse_lora(lora_scale=scale) on fresh copies; unload_lora_weights
    then drops the LoRA layers and keeps the fused weights under their own names."""
    unet, te = copy.deepcopy(components.unet), copy.deepcopy(components.text_encoder)
    pipe = diffusers.StableDiffusionPipeline(components.vae, te, None, unet, components.scheduler,
                                             None, None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {c: {n: p.detach().numpy() for n, p in m.named_parameters()}
            for c, m in (("unet", unet), ("text_encoder", te))}


@pytest.mark.parametrize("name, scale, fmt", [
    ("peft_meta", 1.0, "peft"), ("peft_meta", 0.6, "peft"), ("peft", 0.6, "peft"),
    ("peft_bf16", 0.6, "peft"), ("old", 1.0, "peft"), ("kohya", 1.0, "kohya"),
    ("kohya", 0.6, "kohya"), ("kohya_fp16", 0.6, "kohya"),
])
def test_deltas_match_diffusers_fuse_lora(demo_components, files, name, scale, fmt):
    c = demo_components
    lora = read_lora(files[name], lora_params(c.unet, c.text_encoder))
    assert lora.format == fmt
    ref = fused_by_diffusers(c, files[name], scale)
    base = {comp: {n: p.detach().numpy() for n, p in m.named_parameters()}
            for comp, m in (("unet", c.unet), ("text_encoder", c.text_encoder))}
    changed = {(comp, n) for comp in ref for n in ref[comp]
               if not np.array_equal(ref[comp][n], base[comp][n])}
    assert set(lora.layers) == changed  # every fused parameter, and only those
    for (comp, n), layer in lora.layers.items():
        ours = base[comp][n] + delta(layer, scale)
        err = np.abs(ours - ref[comp][n]).max()
        assert ours.dtype == np.float32 and err <= RTOL * np.abs(ref[comp][n]).max(), (n, err)


def test_scaling_rules(files, demo_components):
    """alpha / rank per module: PEFT metadata's lora_alpha, alpha_pattern and rank_pattern
    (alpha / sqrt(rank) with use_rslora); no metadata: 1 (diffusers' alpha = rank); kohya:
    its .alpha over the module's rank."""
    params = lora_params(demo_components.unet, demo_components.text_encoder)
    with_meta, plain, kohya = (read_lora(files[n], params) for n in ("peft_meta", "peft", "kohya"))
    q = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    ff = ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight")
    conv = ("unet", "mid_block.resnets.0.conv1.weight")
    fc1 = ("text_encoder", "encoder.layers.1.mlp.fc1.weight")
    assert [with_meta.layers[k].scaling for k in (q, ff, conv, fc1)] == [2.0, 0.75, 4.0, 3.0]
    assert {layer.scaling for layer in plain.layers.values()} == {1.0}
    assert [kohya.layers[k].scaling for k in (q, conv)] == [KOHYA_ALPHA / 4, KOHYA_ALPHA / 2]
    assert kohya.layers[conv].down.shape == (2, 32, 3, 3)  # [r, in, kh, kw]
    assert delta(kohya.layers[conv], 1.0).shape == (32, 32, 3, 3)


def test_kohya_alpha_per_module(tmp_path, files, demo_components):
    """kohya-ss and A1111: each module's own .alpha over its rank, alpha = rank where none.
    diffusers 0.42 differs when alphas differ: its alpha_pattern names for attention
    projections match no module (lora_conversion_utils._get_alpha_name), so those get the
    most common alpha (28 of these 73 layers); kohya's rule is the one kept here."""
    tensors = load_file(files["kohya"])
    alphas = sorted(k for k in tensors if k.endswith(".alpha"))
    for i, k in enumerate(alphas):
        tensors[k] = torch.tensor(1.0 + i % 4)
    for k in alphas[::2]:
        del tensors[k]
    save_torch(tensors, tmp_path / "a.safetensors")
    lora = read_lora(tmp_path / "a.safetensors",
                     lora_params(demo_components.unet, demo_components.text_encoder))
    for layer in lora.layers.values():
        rank = layer.down.shape[0]
        alpha = tensors.get(f"{layer.key}.alpha", torch.tensor(float(rank))).item()
        assert layer.scaling == alpha / rank, layer.key


def test_dora_is_refused(tmp_path, files, demo_components):
    meta = load_file_metadata(files["peft_meta"])
    config = json.loads(meta["lora_adapter_metadata"])
    config["unet.use_dora"] = True
    save_torch(load_file(files["peft_meta"]), tmp_path / "dora.safetensors",
               metadata={**meta, "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(LoraError, match="a DoRA adapter"):
        read_lora(tmp_path / "dora.safetensors",
                  lora_params(demo_components.unet, demo_components.text_encoder))


def _tiny_kohya(path: Path, *names: str, width: int = 32) -> Path:
    """Rank-4 kohya pairs for `names`, `width` in and out (the demo text encoder's)."""
    save_file({f"{n}.{s}": np.ones(shape, np.float32) for n in names
               for s, shape in (("lora_down.weight", (4, width)), ("lora_up.weight", (width, 4)),
                                ("alpha", ()))},
              str(path))
    return path


@pytest.mark.parametrize("names, message", [
    (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"],
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q matches no unet parameter of "
     "this model: a LoRA for another architecture (its names are SDXL's)"),
    (["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"],
     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha is an SDXL name: a LoRA for "
     "another architecture"),
    (["lora_unet_single_blocks_0_linear1"], "matches no unet parameter of this model"),
])
def test_another_architecture_is_one_line(tmp_path, demo_components, names, message):
    with pytest.raises(LoraError, match=re.escape(message)) as e:
        read_lora(_tiny_kohya(tmp_path / "x.safetensors", *names),
                  lora_params(demo_components.unet, demo_components.text_encoder))
    assert "\n" not in str(e.value)


def test_shapes_that_do_not_fit(files, demo_components):
    """An SD 2.x LoRA on SD 1.x: same names, other widths."""
    params = lora_params(demo_components.unet, demo_components.text_encoder)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    params["unet"][name] = (32, 12)
    with pytest.raises(LoraError, match=r"attn2.to_k down \[4, 32\] and up \[32, 4\] do not fit "
                                        r".*to_k.weight \[32, 12\]: a LoRA for another"):
        read_lora(files["peft"], params)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker folder
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("file_name, message", [
    ("lora.ckpt", "pickles, which are never loaded"), ("lora.pt", "pickles, which are never loaded"),
    ("lora.bin", "pickles, which are never loaded"), ("lora.safetensors", "not a safetensors file"),
])
def test_pickles_are_never_opened(tmp_path, file_name, message):
    evil = _Evil(tmp_path / "unpickled")
    (tmp_path / file_name).write_bytes(pickle.dumps(evil))
    with pytest.raises(LoraError, match=message):
        read_lora(tmp_path / file_name, {})
    assert not evil.marker.exists()


def test_files_without_lora_weights(tmp_path):
    (tmp_path / "text.safetensors").write_text("not a tensor file\n")
    with pytest.raises(LoraError, match="not a safetensors file"):
        read_lora(tmp_path / "text.safetensors", {})
    with pytest.raises(LoraError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors", {})
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoraError, match="no LoRA weights"):
        read_lora(tmp_path / "empty.safetensors", {})
    save_file({"model.diffusion_model.out.2.weight": np.zeros((4, 4), np.float32)},
              str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(LoraError, match=r"out.2.weight is no kohya \(lora_unet_/lora_te_\) or "
                                        r"diffusers \(unet./text_encoder.\) LoRA weight"):
        read_lora(tmp_path / "checkpoint.safetensors", {})

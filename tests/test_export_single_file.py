"""Single-file (original CompVis/LDM layout) .safetensors checkpoints load through
diffusers' from_single_file against a local config folder, with no hub.

The checkpoint is made here from tiny random components with v1-4's block structure
(4 UNet blocks with 2 resnets each, 4 VAE blocks with 2 resnets) at tiny widths, by
renaming diffusers keys to LDM keys the way diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py does (inverse of the loader's
own conversion). The loaded weights must equal the originals exactly.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from export.components import build_components  # noqa: E402
from export.configs import DEMO, SD14  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.sources import load_single_file  # noqa: E402

TINY_SD14 = dataclasses.replace(
    SD14, name="tiny-sd14", text_encoder=DEMO.text_encoder,
    unet={**SD14.unet, "block_out_channels": (32, 32, 64, 64),
          "cross_attention_dim": DEMO.text_encoder["hidden_size"],
          "sample_size": 16},
    vae={**SD14.vae, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4})


def _unet_map() -> list[tuple[str, str]]:  # (LDM prefix, diffusers prefix)
    m = []
    for i in range(4):
        for j in range(2):
            m.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                m.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            m.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                m.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            m.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            m.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    m.append(("middle_block.1.", "mid_block.attentions.0."))
    m += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return m


UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
          ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for hf, ldm in UNET_TOP.items():
            if k.startswith(hf):
                k = ldm + k[len(hf):]
        if "resnets" in k:
            for ldm, hf in RESNET:
                k = k.replace(hf, ldm)
        for ldm, hf in _unet_map():
            k = k.replace(hf, ldm)
        out["model.diffusion_model." + k] = v
    return out


def vae_to_ldm(sd: dict) -> dict:
    m = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
         ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        m += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        if i < 3:
            m += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
        m += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
    m += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
            ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in sd.items():
        for ldm, hf in m:
            k = k.replace(hf, ldm)
        if "attn_1" in k:
            for ldm, hf in attn:
                k = k.replace(hf, ldm)
            if k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                v = v.reshape(*v.shape, 1, 1)  # linear -> 1x1 conv
        out["first_stage_model." + k] = v
    return out


def text_key(k: str) -> str:
    """Real v1 checkpoints keep transformers 4's `text_model.` level (flattened in transformers 5.6)."""
    return k if k.startswith("text_model.") else "text_model." + k


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    c = build_components(TINY_SD14, seed=5, safety=False)
    sd = {**unet_to_ldm(c.unet.state_dict()), **vae_to_ldm(c.vae.state_dict()),
          **{"cond_stage_model.transformer." + text_key(k): v
             for k, v in c.text_encoder.state_dict().items()}}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return c, path


def test_single_file_loads_the_same_weights(checkpoint):
    c, path = checkpoint
    loaded = load_single_file(path, config=TINY_SD14)
    assert loaded.safety_checker is None and loaded.model_id == str(path)
    for name in ("text_encoder", "unet", "vae"):
        want, got = getattr(c, name).state_dict(), getattr(loaded, name).state_dict()
        missing = [k for k in want if k not in got or not torch.equal(want[k], got[k])]
        assert not missing, f"{name}: {len(missing)} tensors differ, e.g. {missing[:3]}"
    assert loaded.scheduler.config.skip_prk_steps and loaded.scheduler.config.steps_offset == 1


def test_single_file_of_another_architecture_is_one_line(checkpoint):
    _, path = checkpoint
    with pytest.raises(ExportError, match="cannot load") as e:
        load_single_file(path)  # v1-4 widths: shapes do not fit
    assert "\n" not in str(e.value)


def test_pickle_checkpoint_loads_only_with_opt_in(checkpoint, tmp_path):
    c, path = checkpoint
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": safetensors_torch.load_file(str(path))}, ckpt)
    with pytest.raises(ExportError, match="--allow-pickle"):
        load_single_file(ckpt, config=TINY_SD14)
    loaded = load_single_file(ckpt, allow_pickle=True, config=TINY_SD14)
    assert torch.equal(loaded.unet.conv_in.weight, c.unet.conv_in.weight)

"""`python -m export --lora FILE[:SCALE]`: a bundle with LoRAs baked in makes diffusers'
picture of load_lora_weights + fuse_lora(lora_scale=) on the same base weights, within
2/255; the manifest says what was merged; the name map says where every weight went."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from export.bundle_writer import export_bundle  # noqa: E402
from export.cli import main as export_main  # noqa: E402
from export.components import build_components  # noqa: E402
from export.lora_merge import merge_loras  # noqa: E402
from runtime.bundle import read_manifest  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from tests.test_lora import adapters, files  # noqa: E402, F401  (fixtures)
from tests.test_pipeline_parity import PROMPT, compare, reference  # noqa: E402


def diffusers_images(loras, scheduler="euler", seed=4):
    """The demo model in diffusers with each LoRA loaded and fused at its scale."""
    c = build_components("demo", seed=0)
    pipe = reference(c, _bundle_for_tokenizer(), scheduler, safety=False)
    for path, scale in loras:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=path.stem)
        pipe.fuse_lora(lora_scale=scale, adapter_names=[path.stem])
        pipe.unload_lora_weights()
    out = pipe(PROMPT, num_inference_steps=5, guidance_scale=7.5, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed))
    return (out.images * 255).round().astype(np.uint8)


def _bundle_for_tokenizer():
    from runtime.bundle import demo_bundle

    return demo_bundle()  # its tokenizer and scheduler config: the same for every demo export


@pytest.mark.parametrize("names", [[("peft_meta", 0.7)], [("kohya", 1.0)],
                                   [("peft", 0.5), ("kohya", -0.4)]], ids=["peft", "kohya", "two"])
def test_a_merged_lora_matches_diffusers_fuse_lora(files, tmp_path, names):  # noqa: F811
    loras = [(files[n], s) for n, s in names]
    c = build_components("demo", seed=0)
    merged = merge_loras(c, loras)
    bundle = export_bundle(c, tmp_path / "bundle", safety=False, log=lambda m: None,
                           source_extra={"loras": merged})
    assert [m["scale"] for m in read_manifest(bundle).source["loras"]] == [s for _, s in names]
    with Pipeline(bundle, "ort-cpu") as ours:
        got = ours(PROMPT, steps=5, scheduler="euler", seed=4).images
    compare(got, diffusers_images(loras))
    with Pipeline(_bundle_for_tokenizer(), "ort-cpu") as base:  # the LoRA changes the picture
        assert np.abs(base(PROMPT, steps=5, scheduler="euler", seed=4).images.astype(int)
                      - got).max() > 10


def test_the_cli_merges_and_refuses_in_one_line(files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "b"
    assert export_main(["--model", "demo", "--out", str(out), "--no-safety-checker",
                        "--lora", f"{files['kohya']}:0.8"]) == 0
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["loras"][0]["file"] == "kohya.safetensors" and source["loras"][0]["scale"] == 0.8
    bad = tmp_path / "sdxl.safetensors"
    from safetensors.numpy import save_file

    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               np.zeros((4, 8), np.float32)}, str(bad))
    assert export_main(["--model", "demo", "--out", str(tmp_path / "c"), "--lora", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "SDXL" in err[-1] and not (tmp_path / "c").exists()
    assert export_main(["--model", "demo", "--out", str(tmp_path / "d"), "--lora",
                        f"{files['kohya']}:nan"]) == 2


def test_the_name_map_points_at_every_weight(tmp_path):
    """Each recorded weight's bytes in the bundle are the parameter (transposed where the
    exporter made it a MatMul's [in, out]); every Linear/Conv weight is found."""
    c = build_components("demo", seed=0)
    bundle = export_bundle(copy.deepcopy(c), tmp_path / "b", safety=False, log=lambda m: None)
    m = read_manifest(bundle)
    for graph, module in (("unet", c.unet), ("text_encoder", c.text_encoder)):
        params = {n: p.detach().numpy() for n, p in module.named_parameters() if p.dim() >= 2}
        weights = m.graphs[graph].weights
        assert set(weights) == set(params)
        transposed = 0
        for name, w in weights.items():
            a = np.fromfile(bundle / w.file, np.float32, int(np.prod(w.shape)), offset=w.offset)
            want = params[name].T if w.transposed else params[name]
            assert np.array_equal(a.reshape(w.shape), want), name
            transposed += w.transposed
        assert graph == "text_encoder" or transposed > 0  # the UNet's to_q/k/v are MatMuls

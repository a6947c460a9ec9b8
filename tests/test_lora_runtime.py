"""Run-time LoRAs (Pipeline.set_loras) on ort-cpu, against diffusers' load_lora_weights +
fuse_lora on the same base weights: within 2/255; swapping A -> B -> A gives A's image
bit for bit, and [] gives the bundle's own."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from runtime.bundle import demo_bundle  # noqa: E402
from runtime.engine import EngineError  # noqa: E402
from runtime.pipeline import Pipeline, UsageError  # noqa: E402
from tests.test_lora import adapters, files  # noqa: E402, F401  (fixtures)
from tests.test_lora_export import diffusers_images  # noqa: E402
from tests.test_pipeline_parity import PROMPT, compare  # noqa: E402


def images(pipe):
    return pipe(PROMPT, steps=5, scheduler="euler", seed=4, guidance_scale=7.5).images


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as p:
        yield p


def test_runtime_loras_match_diffusers_and_swap_exactly(pipe, files):  # noqa: F811
    base = images(pipe)
    a, b = [(files["peft_meta"], 0.7)], [(files["peft"], 0.5), (files["kohya"], -0.4)]
    pipe.set_loras(a)
    img_a = images(pipe)
    compare(img_a, diffusers_images(a))
    assert np.abs(img_a.astype(int) - base).max() > 10  # the LoRA does something
    unet = pipe.engines["unet"]
    pipe.set_loras(b)  # two stacked, one at a negative scale
    assert pipe.engines["unet"] is unet  # a swap writes the weight inputs: no new session
    compare(images(pipe), diffusers_images(b))
    pipe.set_loras(a)
    assert np.array_equal(images(pipe), img_a)  # A -> B -> A: A's image, bit for bit
    pipe.set_loras([])
    assert np.array_equal(images(pipe), base) and pipe.loras == []


def test_a_lora_only_for_the_unet_leaves_the_text_encoder_alone(pipe, files, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file, save_file

    unet_only = {k: v for k, v in load_file(str(files["kohya"])).items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    text_encoder = pipe.engines["text_encoder"]
    pipe.set_loras([(tmp_path / "unet_only.safetensors", 1.0)])
    assert pipe.engines["text_encoder"] is text_encoder  # not reloaded
    pipe.set_loras([])


def test_bad_loras_and_backends_are_one_line(pipe, tmp_path):
    from safetensors.numpy import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               np.zeros((4, 8), np.float32)}, str(sdxl))
    with pytest.raises(UsageError, match="another architecture"):
        pipe.set_loras([(sdxl, 1.0)])
    with pytest.raises(UsageError, match="pickles"):
        pipe.set_loras([(tmp_path / "x.ckpt", 1.0)])
    pytest.importorskip("openvino")
    with Pipeline(demo_bundle(), "openvino", safety=False) as ov:
        with pytest.raises(UsageError, match="another architecture"):
            ov.set_loras([(sdxl, 1.0)])
        with pytest.raises(UsageError, match="pickles"):
            ov.set_embeddings([tmp_path / "x.pt"])


def test_openvino_loras_recompile_and_swap_exactly(files):  # noqa: F811
    """OpenVINO: a swap reads each touched graph again, puts the LoRAs' weights in and
    compiles it; fp32 within 2/255 of ort-cpu with the same LoRA, A -> B -> A gives A's
    image bit for bit, [] the bundle's own (bf16 too, where the CPU runs it)."""
    pytest.importorskip("openvino")
    a, b = [(files["peft_meta"], 0.7)], [(files["peft"], 0.5), (files["kohya"], -0.4)]
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as ref:
        ref.set_loras(a)
        want_a = images(ref)
    for precision in ("fp32", "auto"):
        with Pipeline(demo_bundle(), "openvino", safety=False, precision=precision) as ov:
            base = images(ov)
            unet = ov.engines["unet"]
            ov.set_loras(a)
            img_a = images(ov)
            assert ov.engines["unet"] is unet and np.abs(img_a.astype(int) - base).max() > 10
            if ov.precision == "fp32":
                compare(img_a, want_a)
            ov.set_loras(b)
            ov.set_loras(a)
            assert np.array_equal(images(ov), img_a)
            ov.set_loras([])
            assert np.array_equal(images(ov), base) and ov.loras == []
    # the UNet's compile fails midway through a swap (after the text encoder's went in):
    # every graph back on its own weights, no LoRA, and the UNet compiles again when used
    with Pipeline(demo_bundle(), "openvino", safety=False, precision="fp32") as ov:
        base, unet = images(ov), ov.engines["unet"]
        real = unet.core

        class OutOfMemory:
            def compile_model(self, *args, **kwargs):
                raise RuntimeError("out of memory compiling")

        unet.core = OutOfMemory()
        with pytest.raises(EngineError, match="out of memory compiling"):
            ov.set_loras(b)
        unet.core = real
        assert ov.loras == [] and np.array_equal(images(ov), base)


def test_the_cli_runs_a_lora_on_ort_cpu(files, tmp_path):  # noqa: F811
    import subprocess
    import sys

    from PIL import Image

    out = subprocess.run([sys.executable, "-m", "runtime.generate", PROMPT, "--steps", "3",
                          "--seed", "2", "--lora", f"{files['kohya']}:0.8", "--output-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backend: ort-cpu (run-time LoRAs and embeddings swap in place there" in out.stderr
    assert "LoRAs: kohya.safetensors:0.8" in out.stderr
    with Image.open(out.stdout.split()[0]) as im:
        assert im.text["loras"] == "kohya.safetensors:0.8" and im.text["backend"] == "ort-cpu"
        params = im.text["parameters"]
    import hashlib

    sha = hashlib.sha256(files["kohya"].read_bytes()).hexdigest()[:12]
    assert params.startswith(f"{PROMPT} <lora:kohya:0.8>\n")  # as A1111 writes it
    assert f'Lora hashes: "kohya: {sha}"' in params


def test_a_swap_that_fails_midway_leaves_the_bundle_weights(files, tmp_path, monkeypatch):  # noqa: F811
    """The text encoder swapped, then the UNet's load fails: every graph is back on the
    bundle's own weights (none missing), the error is raised, and the images are the
    bundle's. A LoRA-ready engine's weights are its graph's inputs: the engine's arrays
    are the one copy (the session holds none of them as initializers)."""
    from runtime import backends
    from runtime.engine import EngineError

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as p:
        base = images(p)
        p.set_loras([(files["peft_meta"], 0.7)])
        for graph in ("unet", "text_encoder"):
            engine, mapped = p.engines[graph], p.manifest.graphs[graph].weights
            assert set(engine.weights) == {w.initializer for w in mapped.values()}
            assert set(engine.weights) <= {t.name for t in engine.session.get_inputs()}
        real = backends.EngineSet.replace_weights

        def fail_on_unet(self, name, manifest, bundle, weights, on_load=None, in_place=False):
            if name == "unet" and weights is not None:
                self.engines.pop(name).release()  # as a real failure: the old one is gone
                raise EngineError("simulated load failure")
            return real(self, name, manifest, bundle, weights, on_load, in_place)

        monkeypatch.setattr(backends.EngineSet, "replace_weights", fail_on_unet)
        with pytest.raises(EngineError, match="simulated"):
            p.set_loras([(files["kohya"], 1.0)])
        assert set(p.engines) >= {"text_encoder", "unet"} and p.loras == []
        assert np.array_equal(images(p), base)


def test_bundle_files_changed_since_load_are_refused(files, tmp_path, monkeypatch):  # noqa: F811
    """Base weights are read from the bundle's files at every swap: they are checked
    against the manifest first (an export over the bundle meanwhile is caught)."""
    import shutil

    from runtime.bundle import BundleError

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    with Pipeline(bundle, "ort-cpu", safety=False) as p:
        p.set_loras([(files["peft_meta"], 0.7)])
        p.set_loras([])
        w = p.manifest.graphs["unet"].weights["conv_in.weight"]
        data = bytearray((bundle / w.file).read_bytes())
        data[w.offset] ^= 0x40
        (bundle / w.file).write_bytes(bytes(data))
        with pytest.raises(BundleError, match="does not match its hash"):
            p.set_loras([(files["peft_meta"], 0.7)])


def test_without_the_onnx_package_loras_are_one_line(files, tmp_path, monkeypatch):  # noqa: F811
    """The LoRA-ready graph is edited with onnx (the `lora` extra): without it, --lora
    says so in one line, exit 2, before any model loads."""
    import importlib.util

    from runtime.generate import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main([PROMPT, "--lora", str(files["kohya"]), "--output-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_a_read_error_during_an_in_place_swap_leaves_the_bundle_weights(files, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """A swap writes the LoRA-ready engine's bound weights in place: a read error halfway
    (some weights new, some old) must not leave that engine running: every graph goes
    back to the bundle's own engine, the error is raised, and the images are the bundle's."""
    from runtime import lora_apply

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as p:
        base = images(p)
        p.set_loras([(files["peft_meta"], 0.7)])
        real, calls = lora_apply.read_base, [0]

        def fail_late(*args):
            calls[0] += 1
            if calls[0] == 30:
                raise OSError("simulated read error")
            return real(*args)

        monkeypatch.setattr(lora_apply, "read_base", fail_late)
        with pytest.raises(OSError, match="simulated"):
            p.set_loras([(files["kohya"], 1.0)])
        assert calls[0] == 30 and p.loras == [] and set(p.engines) >= {"text_encoder", "unet"}
        assert np.array_equal(images(p), base)

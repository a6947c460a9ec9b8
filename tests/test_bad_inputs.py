"""The bad-input corpus (issue 12): what a careless user or a hostile bundle can hand the
CLI, each run through `python -m runtime.generate`'s main in this process.

Every case must end in one `error:` line and exit 2, with no traceback, no output
folder written and no engine loaded. Cases that point outside the bundle (symlinks,
external-data paths) are refused before anything is read. Each case copies the demo
bundle (4.9 MB). Damaged engine-cache entries (CACHE_CASES, sidecars pointing outside
included) are rebuilt instead, and the image is the undamaged run's, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import MANIFEST, demo_bundle
from runtime.generate import main

SCHED = "scheduler_config.json"
VOCAB = "tokenizer/vocab.json"
MERGES = "tokenizer/merges.txt"


def _json(path: Path, edit: Callable[[dict], object]) -> None:
    d = json.loads(path.read_text())
    out = edit(d)
    path.write_text(json.dumps(d if out is None else out))


def manifest(edit: Callable[[dict], object]) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        _json(bundle / MANIFEST, edit)
        return []
    return setup


def unet(**fields: object) -> Callable[[Path, Path], list[str]]:
    return manifest(lambda d: d["graphs"]["unet"].update(fields))


def sched(**fields: object) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        _json(bundle / SCHED, lambda d: d.update(fields))
        return []
    return setup


def replace_file(name: str, how: str) -> Callable[[Path, Path], list[str]]:
    """The bundle file `name` becomes a FIFO, a link to /dev/zero, a link outside the
    bundle, a folder, a 2 MiB sparse file, deep JSON nesting, or text that is not JSON."""
    def setup(bundle: Path, tmp: Path) -> list[str]:
        path = bundle / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        if how == "fifo":
            os.mkfifo(path)
        elif how == "zero":
            path.symlink_to("/dev/zero")
        elif how == "outside":
            outside = tmp / "outside" / Path(name).name
            outside.parent.mkdir(exist_ok=True)
            source = demo_bundle() / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, outside)
            path.symlink_to(outside)
        elif how == "folder":
            path.mkdir()
        elif how == "huge":
            with open(path, "wb") as f:
                f.truncate(2 << 20)
        elif how == "nested":
            path.write_text("[" * 100_000 + "]" * 100_000)
        elif how == "garbage":
            path.write_bytes(b"\xff\xfe not json")
        return []
    return setup


def flags(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda bundle, tmp: list(argv)


def latents(make: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        path = tmp / "latents.npy"
        make(path)
        return ["--latents", str(path)]
    return setup


def _save(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, array)


def _npy_header(path: Path) -> None:  # a header claiming a 10^12-element array
    path.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "
                     b"'shape': (1000000, 1000000), }" + b" " * 40 + b"\n")


def _vocab_ids(bundle: Path, tmp: Path) -> list[str]:
    _json(bundle / VOCAB, lambda d: d.update({"<|endoftext|>": 2**31}))
    return []


def _vocab_not_object(bundle: Path, tmp: Path) -> list[str]:
    (bundle / VOCAB).write_text("[1, 2, 3]")
    return []


def _model(path: str) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        if path == "file":
            (tmp / "file").write_text("x")
            return ["--model", str(tmp / "file")]
        return ["--model", str(tmp / path)]
    return setup


def _output_dir(kind: str) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        (tmp / "a-file").write_text("x")
        return ["--output-dir", str(tmp / "a-file" / "out" if kind == "under" else tmp / "a-file")]
    return setup


SHAPE = [1, 4, 8, 8]  # the demo's default 64x64 image, one per call


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (PIL reads the size before any pixel)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ok_png(path: Path) -> None:
    path.write_bytes(_png(64, 64))


def _sdxl_lora(tmp: Path) -> Path:
    from safetensors.numpy import save_file

    path = tmp / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               np.zeros((4, 8), np.float32)}, str(path))
    return path


def _shared_initializer(d: dict) -> None:
    w = d["graphs"]["unet"]["weights"]
    first, second = list(w)[:2]
    w[second][0] = w[first][0]


def _format_1_0(d: dict) -> None:
    """A manifest as format 1.0 wrote it: no VAE encoder, no minor version, no tokens."""
    d["graphs"].pop("vae_encoder")
    d.pop("format_minor")
    d["profile"].pop("tokens")


def image_file(make: Callable[[Path], None], *more: str) -> Callable[[Path, Path], list[str]]:
    def setup(bundle: Path, tmp: Path) -> list[str]:
        path = tmp / "init.png"
        make(path)
        return ["--init-image", str(path), *more]
    return setup

CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    # -- command-line arguments --------------------------------------------------------
    "steps-0": (flags("--steps", "0"), "steps must be"),
    "steps-text": (flags("--steps", "x"), "invalid int value"),
    "guidance-negative": (flags("--guidance-scale", "-1"), "guidance scale"),
    "guidance-nan": (flags("--guidance-scale", "nan"), "guidance scale"),
    "guidance-huge": (flags("--guidance-scale", "1e9"), "guidance scale"),
    "batch-0": (flags("--batch-size", "0"), "batch size"),
    "batch-65": (flags("--batch-size", "65"), "more than 64"),
    "height-7": (flags("--height", "7"), "height must be a multiple of 8"),
    "width-huge": (flags("--width", "9000"), "width must be a multiple of 8"),
    "seed-negative": (flags("--seed", "-1"), "seed must be"),
    "seed-2-64": (flags("--seed", str(2**64)), "seed must be"),
    "seeds-not-integers": (flags("--seeds", "1,a"), "seeds must be comma-separated integers"),
    "seeds-negative": (flags("--seeds", "1,-2"), "seeds must be integers in [0, 2**64)"),
    "seeds-and-seed": (flags("--seeds", "1,2", "--seed", "3"), "drop --seed/--latents"),
    "seeds-vs-batch-size": (flags("--seeds", "1,2", "--batch-size", "3"), "--seeds sets the batch size"),
    "seeds-65": (flags("--seeds", ",".join(["1"] * 65)), "more than 64"),
    "scheduler-unknown": (flags("--scheduler", "foo"), "unknown scheduler"),
    "backend-unknown": (flags("--backend", "cuda9"), "invalid choice"),
    "precision-unknown": (flags("--precision", "fp8"), "invalid choice"),
    "precision-not-here": (flags("--backend", "ort-cpu", "--precision", "bf16"), "bf16"),
    "flag-unknown": (flags("--stepz", "3"), "unrecognized arguments"),
    "output-dir-is-file": (_output_dir("is"), "not a folder"),
    "output-dir-under-file": (_output_dir("under"), "not a folder"),
    "model-missing": (_model("nowhere"), "model folder not found"),
    "model-is-file": (_model("file"), "model folder not found"),
    # -- prompts -----------------------------------------------------------------------
    "prompt-not-utf8": (lambda b, t: ["--prompt-override", "caf\udce9"], "not valid UTF-8"),
    "negative-not-utf8": (flags("--negative-prompt", "caf\udce9"), "not valid UTF-8"),
    "prompt-weight-malformed": (lambda b, t: ["--prompt-override", "a (cat:1.2.3)"],
                                "prompt syntax: prompt weight '1.2.3' is not a number"),
    "prompt-weight-huge": (lambda b, t: ["--prompt-override", "a (cat:" + "9" * 40 + ")"],
                           "prompt syntax: a prompt weight of 1e+40 is outside"),
    "prompt-10k-chars": (lambda b, t: ["--prompt-override", "(a" * 5000], "more than 8192"),
    "negative-weight-inf": (flags("--negative-prompt", "(x:" + "9" * 400 + ")"), "prompt syntax"),
    # -- latents files -----------------------------------------------------------------
    "latents-missing": (lambda b, t: ["--latents", str(t / "none.npy")], "latents"),
    "latents-empty": (latents(lambda p: p.write_bytes(b"")), "latents"),
    "latents-garbage": (latents(lambda p: p.write_bytes(b"not an npy file")), "latents"),
    "latents-huge-header": (latents(_npy_header), "latents"),
    "latents-wrong-shape": (latents(_save(np.zeros([1, 4, 9, 32], np.float32))), "shape"),
    "latents-nan": (latents(_save(np.full(SHAPE, np.nan, np.float32))), "NaN"),
    "latents-ints": (latents(_save(np.zeros(SHAPE, np.int32))), "float array"),
    "latents-object": (latents(lambda p: np.save(p, np.array([{}]), allow_pickle=True)),
                       "latents"),
    "latents-fifo": (latents(os.mkfifo), "not a regular file"),
    "latents-folder": (latents(lambda p: p.mkdir()), "latents"),
    # -- manifests ---------------------------------------------------------------------
    "format-true": (manifest(lambda d: d.update(format_version=True)), "format version"),
    "format-99": (manifest(lambda d: d.update(format_version=99)), "format version 99"),
    "format-text": (manifest(lambda d: d.update(format_version="1")), "format version"),
    "manifest-list": (manifest(lambda d: [d]), "format version"),
    "hidden-huge": (manifest(lambda d: d.update(hidden=10**400)), "hidden must be"),
    "hidden-text": (manifest(lambda d: d.update(hidden="768")), "hidden must be"),
    "hidden-wrong": (manifest(lambda d: d.update(hidden=769)), "contract"),
    "dtype-float99": (manifest(lambda d: d["graphs"]["unet"]["inputs"][0].update(dtype="float99")),
                      "bad dtype"),
    "shape-negative": (manifest(lambda d: d["graphs"]["vae_decoder"]["outputs"][0].update(
        shape=["B", -3, "H", "W"])), "neither a size"),
    "shape-float": (manifest(lambda d: d["graphs"]["vae_decoder"]["outputs"][0].update(
        shape=["B", 3.5, "H", "W"])), "neither a size"),
    "input-rank": (manifest(lambda d: d["graphs"]["unet"]["inputs"][0].update(
        shape=["N", 4, "h"])), "contract"),
    "tensor-renamed": (manifest(lambda d: d["graphs"]["unet"]["outputs"][0].update(
        name="not_noise_pred")), "contract"),
    "sha256-number": (unet(sha256=12345), "sha256 must be"),
    "xxh3-short": (unet(xxh3="abc"), "xxh3 must be"),
    "external-list": (unet(external_data=["x"]), "external_data must be"),
    "external-absolute": (unet(external_data="/etc/passwd", external_sha256="0" * 64),
                          "not a file name in the bundle"),
    "external-parent": (unet(external_data="../outside.bin", external_sha256="0" * 64),
                        "not a file name in the bundle"),
    "max-abs-error-negative": (unet(max_abs_error=-1), "max_abs_error"),
    "graphs-missing-unet": (manifest(lambda d: d["graphs"].__delitem__("unet")),
                            "missing graphs unet"),
    "graph-unknown": (manifest(lambda d: d["graphs"].update(refiner={})), "unknown graph"),
    "profile-short": (manifest(lambda d: d["profile"].update(batch=[1, 1])), "profile.batch"),
    "profile-huge": (manifest(lambda d: d["profile"].update(height=[8, 512, 10**6])),
                     "profile.height"),
    "profile-unordered": (manifest(lambda d: d["profile"].update(width=[512, 256, 1024])),
                          "min <= opt <= max"),
    "default-size-odd": (manifest(lambda d: d.update(default_height=60)), "multiple of 8"),
    "vae-factor-text": (manifest(lambda d: d.update(vae_scaling_factor="x")), "vae_scaling_factor"),
    "vae-scaling-device": (manifest(lambda d: d.update(vae_scaling="device")), "not supported"),
    "opset-true": (manifest(lambda d: d.update(opset=True)), "opset must be"),
    "manifest-nested": (replace_file(MANIFEST, "nested"), "corrupt"),
    "manifest-garbage": (replace_file(MANIFEST, "garbage"), "corrupt"),
    "manifest-huge": (replace_file(MANIFEST, "huge"), "more than 1048576 allowed"),
    # -- scheduler configs -------------------------------------------------------------
    "timesteps-billion": (sched(num_train_timesteps=10**9), "num_train_timesteps"),
    "timesteps-float": (sched(num_train_timesteps=1000.5), "num_train_timesteps"),
    "timesteps-negative": (sched(num_train_timesteps=-1), "num_train_timesteps"),
    "timesteps-text": (sched(num_train_timesteps="x"), "num_train_timesteps"),
    "beta-schedule-unknown": (sched(beta_schedule="foo"), "beta_schedule"),
    "sched-garbage": (replace_file(SCHED, "garbage"), "corrupt bundle"),
    "sched-nested": (replace_file(SCHED, "nested"), "corrupt bundle"),
    "trained-betas-short": (sched(trained_betas=[0.001] * 10), "trained_betas"),
    "timestep-spacing-bogus": (sched(timestep_spacing="bogus"), "timestep_spacing"),
    "beta-end-5": (sched(beta_end=5), "beta_end"),
    "sched-links-outside": (replace_file(SCHED, "outside"), "links outside the bundle"),
    # -- tokenizer files ---------------------------------------------------------------
    "vocab-huge-id": (_vocab_ids, "corrupt bundle"),
    "vocab-not-object": (_vocab_not_object, "corrupt bundle"),
    "vocab-missing": (lambda b, t: [(b / VOCAB).unlink()][:0], "corrupt bundle"),
    "merges-huge": (replace_file(MERGES, "huge"), "corrupt bundle"),
    # -- symlinks, FIFOs, devices, folders ---------------------------------------------
    "manifest-fifo": (replace_file(MANIFEST, "fifo"), "not a bundle"),
    "manifest-dev-zero": (replace_file(MANIFEST, "zero"), "not a bundle"),
    "sched-fifo": (replace_file(SCHED, "fifo"), "not a regular file"),
    "sched-dev-zero": (replace_file(SCHED, "zero"), "links outside the bundle"),
    "graph-links-outside": (replace_file("unet.onnx", "outside"), "links outside the bundle"),
    "graph-dev-zero": (replace_file("vae_decoder.onnx", "zero"), "links outside the bundle"),
    "graph-fifo": (replace_file("vae_decoder.onnx", "fifo"), "not a regular file"),
    "graph-folder": (replace_file("unet.onnx", "folder"), "not a regular file"),
    "graph-deleted": (lambda b, t: [(b / "unet.onnx").unlink()][:0], "missing unet.onnx"),
    "vocab-fifo": (replace_file(VOCAB, "fifo"), "corrupt bundle"),
    "vocab-links-outside": (replace_file(VOCAB, "outside"), "links outside the bundle"),
    "tokenizer-folder-outside": (replace_file("tokenizer", "outside"), "links outside the bundle"),
    "manifest-links-outside": (replace_file(MANIFEST, "outside"), "links outside the bundle"),
    "external-without-hash": (unet(external_data="unet.onnx.data"), "no external_sha256"),
    # -- img2img and inpainting (issue 13) ---------------------------------------------
    "init-image-missing": (lambda b, t: ["--init-image", str(t / "none.png")], "cannot read image"),
    "init-image-garbage": (image_file(lambda p: p.write_bytes(b"not a png")), "cannot read image"),
    "init-image-empty": (image_file(lambda p: p.write_bytes(b"")), "cannot read image"),
    "init-image-fifo": (image_file(os.mkfifo), "not a regular file"),
    "init-image-folder": (image_file(lambda p: p.mkdir()), "cannot read image"),
    "init-image-truncated": (image_file(lambda p: p.write_bytes(_png(64, 64)[:60])),
                             "cannot read image"),
    "init-image-huge-sides": (image_file(lambda p: p.write_bytes(_png_header(9000, 9000))),
                              "larger than 8192"),
    "init-image-bomb": (image_file(lambda p: p.write_bytes(_png_header(100_000, 100_000))),
                        "cannot read image"),
    "init-image-4px": (image_file(lambda p: p.write_bytes(_png(4, 4))), "at least 8 pixels"),
    "mask-without-image": (lambda b, t: ["--mask", str(_write(t / "m.png", _png(64, 64)))],
                           "--mask needs --init-image"),
    "mask-garbage": (lambda b, t: ["--init-image", str(_write(t / "i.png", _png(64, 64))),
                                   "--mask", str(_write(t / "m.png", b"junk"))],
                     "cannot read image"),
    "strength-0": (image_file(_ok_png, "--strength", "0"), "--strength must be in (0, 1]"),
    "strength-nan": (image_file(_ok_png, "--strength", "nan"), "--strength must be in"),
    "strength-2": (image_file(_ok_png, "--strength", "2"), "--strength must be in"),
    "strength-without-image": (flags("--strength", "0.5"), "--strength needs --init-image"),
    "strength-no-steps": (image_file(_ok_png, "--strength", "0.1"), "leaves no denoising step"),
    "latents-and-image": (lambda b, t: [*image_file(_ok_png)(b, t), *latents(
        _save(np.zeros(SHAPE, np.float32)))(b, t)], "latents cannot be given"),
    "image-on-a-1.0-bundle": (lambda b, t: [*manifest(_format_1_0)(b, t),
                                            *image_file(_ok_png)(b, t)],
                              "no VAE encoder (format 1.0)"),
    "inpainting-model-without-mask": (lambda b, t: [*manifest(lambda d: d["graphs"]["unet"][
        "inputs"][0].update(shape=["N", 9, "h", "w"]))(b, t), *image_file(_ok_png)(b, t)],
        "inpainting model: give a mask"),
    "inpainting-model-txt2img": (manifest(lambda d: d["graphs"]["unet"]["inputs"][0].update(
        shape=["N", 9, "h", "w"])), "give an init image and a mask"),
    "unet-channels-5": (manifest(lambda d: d["graphs"]["unet"]["inputs"][0].update(
        shape=["N", 5, "h", "w"])), "contract"),
    "profile-tokens-76": (manifest(lambda d: d["profile"].update(tokens=[76, 77, 231])),
                          "multiples of 77"),
    "format-minor-text": (manifest(lambda d: d.update(format_minor="1")), "format_minor"),
    # -- LoRAs (issue 14) --------------------------------------------------------------
    "lora-missing": (lambda b, t: ["--lora", str(t / "none.safetensors")], "no such file"),
    "lora-scale-text": (lambda b, t: ["--lora", str(_write(t / "l.safetensors", b"x")) + ":abc"],
                        "is not a number"),
    "lora-scale-nan": (lambda b, t: ["--lora", str(_write(t / "l.safetensors", b"x")) + ":nan"],
                       "scale must be a number"),
    "lora-pickle": (lambda b, t: ["--lora", str(_write(t / "l.ckpt", b"x"))], "pickles"),
    "lora-not-safetensors": (lambda b, t: ["--lora", str(_write(t / "l.safetensors", b"junk"))],
                             "not a safetensors file"),
    "lora-sdxl": (lambda b, t: ["--lora", str(_sdxl_lora(t))], "another architecture"),
    "lora-map-null-file": (lambda b, t: [*manifest(lambda d: d["graphs"]["unet"]["weights"][
        "conv_in.weight"].__setitem__(2, None))(b, t)], "must be [initializer"),
    "lora-map-shared": (manifest(_shared_initializer), "two parameters name"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    setup, message = CASES[case]
    extra = setup(bundle, tmp_path)
    prompt = "a red circle"
    if extra[:1] == ["--prompt-override"]:
        prompt, extra = extra[1], extra[2:]
    argv = [prompt, "--model", str(bundle), "--steps", "1", "--backend", "ort-cpu",
            "--output-dir", str(tmp_path / "out"), *extra]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse (OneLineParser) exits by itself
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert "loaded in" not in err  # refused before any engine loaded (issue 12, item 5)


def test_the_corpus_is_at_least_60_cases():
    assert len(CASES) + len(CACHE_CASES) >= 60


def _sidecar(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: _json(folder / "sidecar.json", edit)


def _artifact(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: damage(folder / "unet.onnx")


def _flip(path: Path) -> None:  # same size, one byte changed
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CACHE_CASES: dict[str, Callable[[Path], None]] = {
    "sidecar-main-outside": _sidecar(lambda d: d.update(main="../../../../etc/passwd")),
    "sidecar-file-outside": _sidecar(lambda d: d["files"].update(
        {"../../x": {"size": 1, "sha256": "0" * 64}})),
    "sidecar-garbage": lambda folder: (folder / "sidecar.json").write_bytes(b"\xff{"),
    "sidecar-version-99": _sidecar(lambda d: d.update(version=99)),
    "sidecar-other-key": _sidecar(lambda d: d["key"].update(capability="sm_90")),
    "sidecar-missing": lambda folder: (folder / "sidecar.json").unlink(),
    "artifact-same-size": _artifact(_flip),
    "artifact-truncated": _artifact(lambda p: p.write_bytes(p.read_bytes()[:100])),
    "artifact-missing": _artifact(Path.unlink),
    "artifact-fifo": _artifact(lambda p: [p.unlink(), os.mkfifo(p)]),
    "sidecar-fifo": lambda folder: [(folder / "sidecar.json").unlink(),
                                    os.mkfifo(folder / "sidecar.json")],
    "sidecar-dev-zero": lambda folder: [(folder / "sidecar.json").unlink(),
                                        (folder / "sidecar.json").symlink_to("/dev/zero")],
    "sidecar-nested": lambda folder: (folder / "sidecar.json").write_text("[" * 100_000),
    "sidecar-size-text": _sidecar(lambda d: d["files"]["unet.onnx"].update(size="big")),
    "sidecar-entry-number": _sidecar(lambda d: d["files"].update({"unet.onnx": 5})),
    "sidecar-no-sha256": _sidecar(lambda d: d["files"]["unet.onnx"].pop("sha256")),
    "sidecar-key-number": _sidecar(lambda d: d["key"].update(shapes=5)),
}


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    os.environ["SDRT_CACHE_DIR"] = str(out / "cache")
    try:
        assert main(["a red circle", "--steps", "2", "--backend", "ort-cpu", "--seed", "1",
                     "--output-dir", str(out / "img")]) == 0
    finally:
        del os.environ["SDRT_CACHE_DIR"]
    [png] = (out / "img").iterdir()
    return png.read_bytes()


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_a_damaged_cache_entry_is_rebuilt_and_the_image_is_right(tmp_path, monkeypatch, capsys,
                                                                  reference_png, case):
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["a red circle", "--steps", "2", "--backend", "ort-cpu", "--seed", "1"]
    assert main([*argv, "--output-dir", str(tmp_path / "first")]) == 0
    [folder] = [p for p in (tmp_path / "cache" / "ort-cpu").glob("unet-*") if p.is_dir()]
    CACHE_CASES[case](folder)
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unet: loaded" in err
    assert "engine cache: rebuilt" in err or "engine cache: built" in err, err
    [png] = (tmp_path / "again").iterdir()
    assert png.read_bytes() == reference_png


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_onnx_external_data_outside_the_bundle_is_never_read(tmp_path, capsys, monkeypatch,
                                                             backend):
    """A graph whose own external-data location leaves the bundle (its hash recorded, so
    only the graph file says it): both backends refuse to read it, and the CLI says the
    bundle cannot be used, in one line, exit 2 (onnxruntime >= 1.24 and OpenVINO check
    the path; this test keeps them to it)."""
    onnx = pytest.importorskip("onnx")
    if backend == "openvino":
        pytest.importorskip("openvino")
    from runtime.integrity import file_hashes
    from tests.fakes.tiny_bundle import make_bundle

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = make_bundle(tmp_path / "bundle")
    for name in (SCHED, "tokenizer"):
        (shutil.copytree if name == "tokenizer" else shutil.copy)(demo_bundle() / name, bundle / name)
    model = onnx.load(str(bundle / "unet.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.bin"
    shutil.copy(bundle / "unet.onnx.data", tmp_path / "outside.bin")  # readable, if asked
    onnx.save(model, str(bundle / "unet.onnx"))
    _json(bundle / MANIFEST, lambda d: d["graphs"]["unet"].update(
        zip(("sha256", "xxh3"), file_hashes(bundle / "unet.onnx"), strict=True)))
    code = main(["x", "--model", str(bundle), "--backend", backend, "--steps", "1",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert last.startswith("error:") and "outside" in last and "cannot be loaded" in last, last
    assert not (tmp_path / "out").exists()

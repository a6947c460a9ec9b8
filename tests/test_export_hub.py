"""Which files a hub export downloads (export.sources.hub_files) on realistic repo listings,
and load_from_hub with the hub faked (no network): the patterns it passes, its one-line
errors, and a fake repo of the demo weights that loads from exactly those files."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from export import sources
from export.checks import check_diffusers_folder
from export.errors import ExportError
from export.sources import hub_files

CONFIGS = [
    "feature_extractor/preprocessor_config.json", "model_index.json", "safety_checker/config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "vae/config.json",
]
DEFAULT_ST = ["safety_checker/model.safetensors", "text_encoder/model.safetensors",
              "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
DEFAULT_BIN = ["safety_checker/pytorch_model.bin", "text_encoder/pytorch_model.bin",
               "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin"]
FP16_ST = [n.replace(".safetensors", ".fp16.safetensors") for n in DEFAULT_ST]
FP16_BIN = [n.replace(".bin", ".fp16.bin") for n in DEFAULT_BIN]

# CompVis/stable-diffusion-v1-4: default, fp16, ema and non_ema variants as .bin and
# .safetensors, flax weights, and original-format checkpoints at the top level
SD14 = CONFIGS + DEFAULT_ST + DEFAULT_BIN + FP16_ST + FP16_BIN + [
    ".gitattributes", "README.md", "sd-v1-4.ckpt", "sd-v1-4-full-ema.ckpt", "v1-variants-scores.jpg",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.ema.safetensors", "unet/diffusion_flax_model.msgpack",
    "text_encoder/flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
    "safety_checker/flax_model.msgpack",
]
# runwayml/stable-diffusion-v1-5-like: the same folders, plus single-file .safetensors and a yaml on top
SD15 = CONFIGS + DEFAULT_ST + DEFAULT_BIN + FP16_ST + FP16_BIN + [
    "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors", "v1-inference.yaml", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
]
SAFETY_FOLDERS = ("safety_checker/", "feature_extractor/")


def without_safety(names):
    return sorted(n for n in names if not n.startswith(SAFETY_FOLDERS))


@pytest.mark.parametrize("listing", [SD14, SD15], ids=["sd14", "sd15"])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_default_safetensors_only(listing, allow_pickle):
    """Default weights as safetensors, even with --allow-pickle; no other variant, no .ckpt."""
    got = hub_files("r/m", listing, allow_pickle=allow_pickle, safety=True)
    assert got == sorted(CONFIGS + DEFAULT_ST)


def test_safety_off_leaves_the_checker_folders_out():
    got = hub_files("r/m", SD14, allow_pickle=False, safety=False)
    assert got == without_safety(CONFIGS + DEFAULT_ST)


def test_only_fp16_weights_take_the_fp16_variant():
    """diffusers' variant="fp16": chosen only where a folder has no default weights."""
    got = hub_files("r/m", CONFIGS + FP16_ST + FP16_BIN, allow_pickle=True, safety=True)
    assert got == sorted(CONFIGS + FP16_ST)
    mixed = CONFIGS + FP16_ST + [n for n in DEFAULT_ST if not n.startswith("unet/")]
    got = hub_files("r/m", mixed, allow_pickle=False, safety=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "text_encoder/model.safetensors" in got and "text_encoder/model.fp16.safetensors" not in got


def test_pickle_weights():
    """.bin only with allow_pickle, and only where that choice has no safetensors."""
    old = CONFIGS + DEFAULT_BIN + FP16_BIN  # a repo from before safetensors
    assert hub_files("r/m", old, allow_pickle=True, safety=True) == sorted(CONFIGS + DEFAULT_BIN)
    with pytest.raises(ExportError, match=r"^r/m/\w+ has only pickle weights .* --allow-pickle"):
        hub_files("r/m", old, allow_pickle=False, safety=True)
    with pytest.raises(ExportError, match="only pickle"):
        hub_files("r/m", CONFIGS + FP16_BIN, allow_pickle=False, safety=True)
    assert hub_files("r/m", CONFIGS + FP16_BIN, allow_pickle=True, safety=True) == sorted(CONFIGS + FP16_BIN)
    # default .bin beside fp16 safetensors: the default weights, as diffusers loads them ...
    both = CONFIGS + DEFAULT_BIN + FP16_ST
    assert hub_files("r/m", both, allow_pickle=True, safety=True) == sorted(CONFIGS + DEFAULT_BIN)
    # ... and without --allow-pickle the fp16 safetensors
    assert hub_files("r/m", both, allow_pickle=False, safety=True) == sorted(CONFIGS + FP16_ST)


def test_sharded_weights_keep_their_index():
    te = ["text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
          "text_encoder/model.safetensors.index.json"]
    te16 = ["text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.fp16-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.fp16.json"]
    rest = [n for n in DEFAULT_ST if not n.startswith("text_encoder/")]
    got = hub_files("r/m", CONFIGS + te + te16 + rest + FP16_ST, allow_pickle=False, safety=True)
    assert got == sorted(CONFIGS + te + rest)
    got = hub_files("r/m", CONFIGS + te16 + FP16_ST[:1] + FP16_ST[2:], allow_pickle=False, safety=True)
    assert [n for n in got if n.startswith("text_encoder/")] == sorted(["text_encoder/config.json", *te16])
    legacy = ["unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
              "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
              "unet/diffusion_pytorch_model.safetensors.fp16.index.json"]
    listing = [n for n in CONFIGS + DEFAULT_ST if not n.startswith("unet/diff")] + legacy
    got = hub_files("r/m", listing, allow_pickle=False, safety=True)
    assert set(legacy) <= set(got)


@pytest.mark.parametrize("listing, message", [
    ([n for n in SD14 if n != "model_index.json"], r"^r/m is not a diffusers model \(no model_index.json\)$"),
    ([n for n in SD14 if not n.startswith(("unet/", "tokenizer/"))], r"\(missing unet, tokenizer\)$"),
    ([n for n in SD14 if not n.startswith("vae/diffusion")], r"^r/m/vae has no default or fp16 weights"),
    ([n for n in SD14 if not n.startswith("unet/diffusion_pytorch_model.")
      or ".non_ema." in n or ".ema." in n], r"^r/m/unet has no default or fp16 weights"),
])
def test_unusable_repos_are_refused_before_download(listing, message):
    with pytest.raises(ExportError, match=message):
        hub_files("r/m", listing, allow_pickle=True, safety=True)


def test_safety_checker_weights_only_needed_with_safety():
    listing = [n for n in SD14 if not n.startswith("safety_checker/") or n.endswith(".json")]
    with pytest.raises(ExportError, match="^r/m/safety_checker has no default or fp16 weights"):
        hub_files("r/m", listing, allow_pickle=False, safety=True)
    assert hub_files("r/m", listing, allow_pickle=False, safety=False) == without_safety(CONFIGS + DEFAULT_ST)


def materialize(root: Path, names):
    """Empty files (JSON: {}) for `names` under `root`, as a download of them would leave."""
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_text("{}" if n.endswith(".json") else "")
    (root / "model_index.json").write_text('{"safety_checker": ["stable_diffusion", "X"]}')
    return root


@pytest.mark.parametrize("listing, allow_pickle, variant", [
    (SD14, False, None), (SD14, True, None), (CONFIGS + FP16_ST + DEFAULT_BIN, False, "fp16"),
    (CONFIGS + FP16_BIN, True, "fp16"), (CONFIGS + DEFAULT_BIN + FP16_ST, True, None),
])
def test_the_download_passes_the_folder_check(tmp_path, listing, allow_pickle, variant):
    """check_diffusers_folder reads the same variant from the downloaded files."""
    folder = materialize(tmp_path, hub_files("r/m", listing, allow_pickle=allow_pickle, safety=True))
    variants, use_checker = check_diffusers_folder(folder, allow_pickle, True)
    assert use_checker and variants == dict.fromkeys(("text_encoder", "unet", "vae", "safety_checker"),
                                                     variant)


class FakeHub:
    """huggingface_hub's model_info and snapshot_download over a local "repo" folder: the
    download copies the files allow_patterns selects, as snapshot_download filters them."""

    def __init__(self, monkeypatch, repo: Path, snapshot: Path, listing=None):
        self.repo, self.snapshot, self.calls = repo, snapshot, []
        names = listing or sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
        self.info = SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=n) for n in names])
        monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda api, repo_id: self.info)
        monkeypatch.setattr("huggingface_hub.snapshot_download", self.download)

    def download(self, repo_id, *, revision, allow_patterns):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append((repo_id, revision, allow_patterns))
        names = [s.rfilename for s in self.info.siblings]
        for n in filter_repo_objects(names, allow_patterns=allow_patterns):
            (self.snapshot / n).parent.mkdir(parents=True, exist_ok=True)
            if (self.repo / n).is_file():
                shutil.copyfile(self.repo / n, self.snapshot / n)
        return str(self.snapshot)


def test_load_from_hub_downloads_exactly_the_chosen_files(monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(sources, "load_diffusers_folder", lambda path, **kw: loaded.append((path, kw)))
    odd = ["tokenizer/a[1]*.json", "tokenizer/a1x.json"]  # fnmatch characters match only themselves
    hub = FakeHub(monkeypatch, tmp_path / "repo", tmp_path / "snap", listing=SD14 + odd[:1])
    sources.load_from_hub("CompVis/stable-diffusion-v1-4", safety=False)
    ((repo_id, revision, patterns),) = hub.calls
    assert repo_id == "CompVis/stable-diffusion-v1-4" and revision == "0" * 40
    from huggingface_hub.utils import filter_repo_objects

    selected = sorted(filter_repo_objects(SD14 + odd, allow_patterns=patterns))
    assert selected == without_safety(CONFIGS + DEFAULT_ST + odd[:1])
    assert loaded == [(tmp_path / "snap", {"allow_pickle": False, "safety": False,
                                           "model_id": "CompVis/stable-diffusion-v1-4",
                                           "variants": {"text_encoder": None, "unet": None,
                                                        "vae": None}})]


def test_hub_errors_are_one_line(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise OSError("connection reset\nretry 2 of 3\ntraceback ...")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", fail)
    with pytest.raises(ExportError) as e:
        sources.load_from_hub("r/m")
    assert str(e.value) == "cannot list the files of r/m on the hub: OSError: connection reset"

    hub = FakeHub(monkeypatch, tmp_path, tmp_path, listing=SD14)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(ExportError) as e:
        sources.load_from_hub("r/m")
    assert str(e.value) == "cannot download r/m from the hub: OSError: connection reset"

    hub.info.siblings = [s for s in hub.info.siblings if not s.rfilename.endswith(".safetensors")]
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.download)
    with pytest.raises(ExportError, match="only pickle weights") as e:
        sources.load_from_hub("r/m")
    assert "\n" not in str(e.value) and hub.calls == []  # refused before any download


def _demo_repo(c, tmp_path, default: bool = True):
    """A hub repo saved by diffusers from the demo weights: the fp16 variant, and the
    default weights too unless `default` is False."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from export.clip_vocab import write_tokenizer_files

    write_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"))
    pipe = StableDiffusionPipeline(c.vae, c.text_encoder, tokenizer, c.unet, c.scheduler,
                                   c.safety_checker, CLIPImageProcessor())
    repo = tmp_path / "repo"
    pipe.save_pretrained(repo, variant="fp16")
    if default:
        pipe.save_pretrained(repo)
    return repo


@pytest.mark.parametrize("fp16_only", [False, True])
def test_a_hub_repo_of_the_demo_weights_loads(demo_components, monkeypatch, tmp_path, fp16_only):
    """A repo saved by diffusers with default and fp16 variants (and a broken non_ema decoy,
    a top-level .ckpt) loads from the downloaded subset with the demo's weights."""
    torch = pytest.importorskip("torch")
    c = demo_components
    repo = _demo_repo(c, tmp_path, default=not fp16_only)
    (repo / "unet" / "diffusion_pytorch_model.non_ema.safetensors").write_bytes(b"not weights")
    (repo / "sd.ckpt").write_bytes(b"not weights")
    hub = FakeHub(monkeypatch, repo, tmp_path / "snap")
    got = sources.load_from_hub("r/demo")
    assert len(hub.calls) == 1 and got.model_id == "r/demo" and got.safety_checker is not None
    files = {str(p.relative_to(tmp_path / "snap")) for p in (tmp_path / "snap").rglob("*") if p.is_file()}
    weights = {n for n in files if n.endswith(".safetensors")}
    suffix = ".fp16.safetensors" if fp16_only else ".safetensors"
    assert weights == {n.replace(".safetensors", suffix) for n in DEFAULT_ST}
    assert "sd.ckpt" not in files
    for name in ("text_encoder", "unet", "vae", "safety_checker"):
        want, have = getattr(c, name).state_dict(), getattr(got, name).state_dict()
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) for k in want), name


def test_asking_for_fp16_downloads_fp16_where_it_exists():
    """export --variant fp16: the fp16 files only (half the download), the default
    weights where a folder has no fp16, as diffusers' variant="fp16"."""
    got = hub_files("r/m", SD14, allow_pickle=False, safety=True, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    no_fp16_unet = [n for n in SD14 if not (n.startswith("unet/") and ".fp16." in n)]
    got = hub_files("r/m", no_fp16_unet, allow_pickle=False, safety=True, variant="fp16")
    assert "unet/diffusion_pytorch_model.safetensors" in got


def test_variant_is_for_hub_ids_only(tmp_path, capsys):
    from export.cli import main

    assert main(["--model", "demo", "--out", str(tmp_path / "b"), "--variant", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a hub id" in err and not (tmp_path / "b").exists()


def test_asked_for_fp16_the_fp16_weights_load_even_beside_earlier_downloads(
        demo_components, monkeypatch, tmp_path):
    """A hub snapshot folder keeps files fetched before: after a default-weights export,
    --variant fp16 must still load the fp16 files, not what else lies there."""
    pytest.importorskip("torch")
    FakeHub(monkeypatch, _demo_repo(demo_components, tmp_path), tmp_path / "snap")
    sources.load_from_hub("r/demo")  # the default weights, now in the snapshot folder
    seen = {}
    real = sources.load_diffusers_folder
    monkeypatch.setattr(sources, "load_diffusers_folder",
                        lambda *a, **kw: seen.update(kw["variants"]) or real(*a, **kw))
    sources.load_from_hub("r/demo", variant="fp16")
    assert seen == {"text_encoder": "fp16", "unet": "fp16", "vae": "fp16", "safety_checker": "fp16"}

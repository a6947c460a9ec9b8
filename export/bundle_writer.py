"""Write a bundle: graphs, tokenizer files, scheduler_config.json, manifest.json.

Everything goes into a temporary folder beside the output, which is renamed into place
only when complete, so a failed or interrupted export never leaves a half-written or
half-overwritten bundle. An export holds `.<out>.lock` beside the output while it runs,
so the next export to the same output removes the temporary folders of one that was
killed (as large as the model) and never those of one still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from export.checks import check_opset, check_out, export_profile
from export.clip_vocab import write_tokenizer_files
from export.components import Components, weights_sha256
from export.configs import CONFIGS
from export.errors import ExportError
from export.graphs import GraphJob, check_io, export_onnx, graph_jobs, max_abs_error, ort_session, timed
from export.tokenizer_files import copy_tokenizer
from export.weight_map import weight_map
from runtime.bundle import (
    INPAINT_CHANNELS,
    LATENT_CHANNELS,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    GraphEntry,
    GraphSpec,
    Manifest,
    Profile,
    WeightRef,
)
from runtime.integrity import file_hashes

TWO_GB = 2**31  # protobuf's limit for one serialized ModelProto
PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _write_graph(job: GraphJob, folder: Path, opset: int, threshold: int,
                 lora_module: torch.nn.Module | None = None) -> GraphEntry:
    """Export one graph into `folder`; external data (one .onnx.data file) above `threshold` bytes."""
    spec = job.spec
    scratch = folder / f".{spec.name}.export"
    scratch.mkdir()
    export_onnx(job, scratch / spec.file, opset)
    size = sum(f.stat().st_size for f in scratch.iterdir())  # graph + per-weight files if > 2 GB
    external = f"{spec.file}.data" if size > min(threshold, TWO_GB) else None
    if external:
        _gather_external_data(scratch / spec.file, folder / spec.file, external, spec)
    else:
        model = onnx.load(str(scratch / spec.file))
        check_io(model, spec)
        onnx.save_model(model, str(folder / spec.file))
        del model
    shutil.rmtree(scratch)
    err = max_abs_error(ort_session(folder / spec.file), job)
    sha, fast = file_hashes(folder / spec.file)
    ext_sha, ext_fast = file_hashes(folder / external) if external else (None, None)
    weights = None
    if lora_module is not None:  # where each weight went: LoRA at run time (weight_map.py)
        weights = {k: WeightRef(w[0], w[1], w[2], w[3], tuple(w[4]))
                   for k, w in weight_map(folder / spec.file, lora_module).items()}
    return GraphEntry(spec, sha, external, ext_sha, err, fast, ext_fast, weights)


def _gather_external_data(src: Path, dest: Path, data_name: str, spec: GraphSpec,
                          min_bytes: int = 1024) -> None:
    """Save `src` as `dest` + one `data_name` file holding every initializer of >= min_bytes.

    Streams tensor by tensor (from torch's per-weight files, or from the graph itself), so
    a 3.4 GB UNet is never held twice in memory.
    """
    model = onnx.load(str(src), load_external_data=False)
    check_io(model, spec)
    offset = 0
    with open(dest.parent / data_name, "wb") as data:
        for t in model.graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                with open(src.parent / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    blob = f.read(info.length) if info.length else f.read()
            elif len(t.raw_data) >= min_bytes:
                blob = t.raw_data
            else:
                continue
            data.write(blob)
            t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", len(blob))):
                t.external_data.add(key=key, value=str(value))
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += len(blob)
    onnx.save_model(model, str(dest))


def _write_tokenizer(c: Components, dest: Path) -> None:
    if c.tokenizer_dir is None:
        write_tokenizer_files(dest)  # CLIP's real BPE vocabulary (= v1-4's tokenizer/)
        return
    copy_tokenizer(c.tokenizer_dir, dest)


def scheduler_config_json(scheduler) -> str:
    """diffusers' scheduler_config.json minus the keys diffusers filled in with this class's
    defaults (`_use_default_values`), i.e. the model's own file. This matters: v1-4's file has
    no timestep_spacing, so diffusers' Euler built from it uses Euler's default (linspace),
    while a file that spelled out PNDM's default ("leading") would give Euler "leading"."""
    config = json.loads(scheduler.to_json_string())
    for key in scheduler.config.get("_use_default_values", []):
        config.pop(key, None)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def export_bundle(components: Components, out_dir: str | os.PathLike, *, opset: int = 17,
                  external_data_threshold: int = TWO_GB, safety: bool = True, force: bool = False,
                  profile: Profile | None = None, min_size: int | None = None,
                  max_size: int | None = None, max_batch: int | None = None,
                  log: Callable[[str], None] = print, source_extra: dict | None = None) -> Path:
    """Export `components` to the bundle folder `out_dir` and return its path.

    opset                    ONNX opset (>= 17).
    external_data_threshold  graphs whose weights exceed this many bytes are saved with one
                             external data file `<graph>.onnx.data` (tests force it small).
    safety                   export the safety checker when the components have one.
    force                    replace an existing bundle at `out_dir`.
    profile                  min/opt/max batch and size, as is; default: runtime.bundle
                             .fit_profile of the model's default size with min_size,
                             max_size, max_batch over the model config's profile (demo,
                             sd14-random) or Profile(): the default size always inside.
    log                      called with one progress line per graph (with its time).
    source_extra             more facts for the manifest's `source` (e.g. merged LoRAs).

    Raises ExportError for a bad `out_dir`; anything else is a bug or a bad model.
    """
    out = Path(out_dir).absolute()
    check_out(out, force)
    channels = components.unet.config.in_channels
    if channels not in (LATENT_CHANNELS, INPAINT_CHANNELS):
        raise ExportError(f"the UNet takes {channels} input channels; this runtime runs "
                          f"{LATENT_CHANNELS} (text-to-image) or {INPAINT_CHANNELS} (inpainting)")
    check_opset(opset)
    if profile is None:
        cfg = CONFIGS.get(components.model_id)
        profile = export_profile(components.default_size, min_size, max_size, max_batch,
                                 base=cfg.profile if cfg else None)
    elif (min_size, max_size, max_batch) != (None, None, None):
        raise ExportError("pass a profile or min_size/max_size/max_batch, not both")
    elif not profile.covers(1, components.default_size, components.default_size):
        raise ExportError(f"the profile leaves out the model's default size "
                          f"{components.default_size}x{components.default_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _only_export_to(out):
        check_out(out, force)  # again: another export may have finished before we locked
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            graphs = {}
            lora_modules = {"text_encoder": components.text_encoder, "unet": components.unet}
            for job in graph_jobs(components, safety):
                entry, seconds = timed(lambda job=job: _write_graph(
                    job, tmp, opset, external_data_threshold, lora_modules.get(job.spec.name)))
                graphs[job.spec.name] = entry
                ext = f" + {entry.external_data}" if entry.external_data else ""
                log(f"{job.spec.name}: {entry.file}{ext} in {seconds:.1f} s, "
                    f"max abs error vs torch {entry.max_abs_error:.1e}")
            _write_tokenizer(components, tmp / TOKENIZER_DIR)
            (tmp / SCHEDULER_CONFIG).write_text(scheduler_config_json(components.scheduler))
            size = components.default_size
            Manifest(
                source={"model": components.model_id, "hash": weights_sha256(components),
                        **(source_extra or {})},
                hidden=components.hidden, graphs=graphs, profile=profile,
                default_height=size, default_width=size, opset=opset, packages=package_versions(),
                vae_scaling_factor=float(components.vae.config.scaling_factor),
            ).write(tmp)
            tmp.chmod(0o755)  # mkdtemp made it 0700
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


@contextlib.contextmanager
def _only_export_to(out: Path) -> Iterator[None]:
    """Hold an flock on `.<out>.lock` beside `out`, removed when done (a killed export's
    stays, empty, until the next export to `out`); ExportError when another export to
    `out` holds it, or held it and removed it while we opened it."""
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino:
                raise BlockingIOError  # we locked a removed lock file: that export just ended
        except (BlockingIOError, FileNotFoundError):
            raise ExportError(f"another export to {out} is running; wait for it to finish "
                              f"or choose another --out") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # still held: whoever opens it next gets a new one


def _remove_leftovers(out: Path) -> None:
    """Remove what exports to `out` that died left beside it (kill -9, power loss): their
    temporary `.<out>.<random>.tmp` and `.<out>.<random>.old` folders (tempfile's random
    part has no dots, so another output's, `.<out>.v2.<random>.tmp`, never matches).
    Called under `_only_export_to(out)`, so none belongs to a live export."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]+\.(tmp|old)")
    for p in out.parent.iterdir():
        if stale.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

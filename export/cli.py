"""`python -m export`: one model -> one bundle folder. User errors: one line, exit 2."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from export.checks import check_opset, check_out, check_profile_flags, check_seed, model_kind
from export.errors import ExportError
from runtime.args import OneLineParser
from runtime.lora import LoraError, parse_lora_arg


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m export", description=(
        "Export a Stable Diffusion v1.x model to an ONNX bundle (text_encoder, unet, vae_decoder, "
        "safety_checker, tokenizer/, scheduler_config.json, manifest.json)."))
    p.add_argument("--model", required=True, help=(
        "demo | sd14-random | a diffusers folder | a .safetensors checkpoint | a hub id"))
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument("--no-safety-checker", action="store_true", help="leave the safety checker out")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle checkpoints (.ckpt/.bin), which can run code when loaded")
    p.add_argument("--seed", type=int, default=0,
                   help="weights seed for sd14-random (demo: only its random safety checker)")
    p.add_argument("--variant", choices=("fp16",), default=None,
                   help="hub ids: download the fp16 weights (half the download; the bundle is "
                        "still fp32, converted from them); default: the default weights")
    p.add_argument("--min-size", type=int, help="smallest image side the bundle is for, in pixels "
                   "(default 256, demo 64; widened to the model's default size if needed)")
    p.add_argument("--max-size", type=int, help="largest image side, in pixels (default 1024, "
                   "demo 512)")
    p.add_argument("--max-batch", type=int, help="most images per call (default 4)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="bake a LoRA (.safetensors, kohya/A1111 or diffusers/PEFT) into the "
                        "weights at SCALE (default 1); repeatable, applied in order")
    return p


def quiet_libraries() -> None:
    """This process only: transformers/diffusers log errors only (no torchvision notices)."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        args = parser().parse_args(argv)
        check_out(args.out, args.force)  # fail fast: before importing torch or loading
        check_opset(args.opset)
        check_seed(args.seed)
        check_profile_flags(args.min_size, args.max_size, args.max_batch)
        if model_kind(args.model, args.allow_pickle, not args.no_safety_checker) != "hub" \
                and args.variant:
            raise ExportError(f"--variant picks which weights a hub export downloads; "
                              f"{args.model} is not a hub id")
        try:
            loras = [parse_lora_arg(text) for text in args.lora]
        except LoraError as e:
            raise ExportError(str(e)) from None
        for path, _ in loras:
            if not path.is_file():
                raise ExportError(f"--lora {path}: no such file")
        t0 = time.perf_counter()
        quiet_libraries()
        from export.bundle_writer import export_bundle
        from export.lora_merge import merge_loras
        from export.sources import load_components

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python code
            components = load_components(args.model, allow_pickle=args.allow_pickle,
                                         safety=not args.no_safety_checker, seed=args.seed,
                                         variant=args.variant)
            log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
            merged = merge_loras(components, loras)
            for m in merged:
                log(f"merged LoRA {m['file']} at scale {m['scale']:g} ({m['layers']} layers)")
            out = export_bundle(components, args.out, opset=args.opset, force=args.force,
                                min_size=args.min_size, max_size=args.max_size,
                                max_batch=args.max_batch,
                                safety=not args.no_safety_checker, log=log,
                                source_extra={"loras": merged} if merged else None)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder went away or filled up mid-export
        print(f"error: cannot write the bundle: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    print(out)
    return 0

"""Train the demo model on captioned shapes (shapes.py): the VAE first, then the text
encoder and UNet together, with the real SD v1 classes at tiny widths.

    python -m export.demo_model.train --out /tmp/demo-train [--device cpu]
    python -m runtime.generate "a red star on a blue background" --model /tmp/demo-train/bundle

Seeded and resumable: each stage saves a checkpoint (`vae.pt`, `denoiser.pt`, with the
optimizer and step) every `--save-every` steps and at the end; run again with the same
`--out` to go on from there. The final weights go to `--out/weights.safetensors`
(weights.py's format, fp16) and, exported, to the bundle `--out/bundle`. The shipped
demo is this script's default run: its weights are export/demo_model/weights.safetensors,
which `python -m export --model demo` exports.

Recipe (why): pictures whose two colours are jittered (JITTER), so the model knows a
neighbourhood of each colour, not a point. The VAE with an L1 + small KL loss (crisp
edges for the shape judge) and a pull of three latent channels towards each 8x8 cell's
mean colour (ANCHOR): latents close to a linear map of colour, as SD's are, so that
guidance's extrapolation in latent space stays an extrapolation in colour. Latents
rescaled so their std is 1 / scaling_factor (SD v1's contract: the UNet sees
unit-variance latents); then epsilon prediction on v1-4's noise schedule with 10% of
captions dropped to "" (classifier-free guidance needs an unconditional model), AdamW, a
cosine learning rate. 3000 steps, not more: longer-trained models follow the prompt
without guidance as well as with it (12000 steps: all 48 checks at guidance 1), and the
demo should show what guidance does. Pairs in shapes.HELD_OUT are never shown, so the test can
ask for new combinations.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from export.demo_model import checkpoint, shapes, weights

DATASET = 20_000  # pictures, drawn once from the seed
DROP = 0.1  # captions dropped for classifier-free guidance
LR = 1e-3  # text encoder + UNet, cosine down to a tenth
VAE_LR = 2e-3
JITTER = 24  # per RGB channel, each picture's two colours (shapes.random_scene)
ANCHOR = 0.1  # weight of the pull of latent channels 0-2 towards each 8x8 cell's mean RGB


def config():
    """The demo's config (export/configs.py DEMO: SD v1's classes and interfaces at tiny
    widths, 64x64 pixels) without its trained weights: what training starts from."""
    import dataclasses

    from export.configs import DEMO

    return dataclasses.replace(DEMO, weights=None)


def components():
    """Fresh (random) text encoder, UNet and VAE of the trained demo config."""
    from export.components import build_components

    c = build_components(config(), seed=0, safety=False)
    return c.text_encoder.train(), c.unet.train(), c.vae.train()


def dataset(seed: int, n: int = DATASET) -> tuple[np.ndarray, list[str]]:
    return shapes.batch(np.random.default_rng(seed), n, shapes.HELD_OUT, JITTER)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cosine(step: int, total: int, lr: float) -> float:
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def train_vae(vae, images: torch.Tensor, out: Path, steps: int, batch: int, device: str,
              save_every: int, run: dict) -> None:
    """L1 + small KL + ANCHOR on `images` [N, 3, 64, 64] in [-1, 1]; `run`: what the
    checkpoint must match to be resumed (checkpoint.py)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    ckpt = out / "vae.pt"
    gen = torch.Generator().manual_seed(1000 + run["seed"])  # which pictures, in what order
    start = checkpoint.resume(ckpt, {"vae": vae}, opt, gen, run, steps)
    vae.to(device)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, VAE_LR)
        x = images[torch.randint(len(images), (batch,), generator=gen)].to(device)  # [B, 3, 64, 64]
        post = vae.encode(x).latent_dist  # mean, std [B, 4, 8, 8]
        z = post.mean + post.std * torch.randn_like(post.std)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        # SD's latents are close to a linear map of colour; ours are pulled there too, so
        # guidance's extrapolation in latent space is an extrapolation in colour
        anchor = F.l1_loss(post.mean[:, :3], F.avg_pool2d(x, 8))
        loss = F.l1_loss(rec, x) + 1e-4 * kl + ANCHOR * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(l1=f"{F.l1_loss(rec, x).item():.4f}", kl=f"{kl.item():.3f}",
                            anchor=f"{anchor.item():.3f}")
        if (step + 1) % save_every == 0:
            vae.cpu()
            checkpoint.save(ckpt, {"vae": vae}, opt, gen, step + 1, run)
            vae.to(device)
    vae.cpu()
    checkpoint.save(ckpt, {"vae": vae}, opt, gen, steps, run)


@torch.no_grad()
def report_vae(vae, seed: int, n: int = 256) -> float:
    """How often the judge reads the right colour and shape off VAE reconstructions of
    fresh pictures (the ceiling for the whole model); printed and returned."""
    rng = np.random.default_rng(seed + 99)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    x = to_tensor(np.stack([shapes.draw(s) for s in scenes]))
    vae.eval()
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    pics = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = sum(shapes.judge(p).colour == s.colour and shapes.judge(p).shape == s.shape
               for p, s in zip(pics, scenes, strict=True))
    print(f"vae: the judge reads {hits}/{n} reconstructions right")
    vae.train()
    return hits / n


@torch.no_grad()
def rescale_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Scale the latent space (quant_conv's mean rows, post_quant_conv's inputs) so that
    latents * scaling_factor have unit std, exactly as before otherwise; the latents'
    means [N, 4, h, w] after it."""
    vae.eval()
    means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean
                       for i in range(0, len(images), 256)])
    k = 1.0 / (float(means.std()) * vae.config.scaling_factor)
    c = means.shape[1]
    vae.quant_conv.weight[:c] *= k  # moments = [mean, logvar]
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return means * k


def train_denoiser(text, unet, latents: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor,
                   out: Path, steps: int, batch: int, device: str, save_every: int,
                   scaling: float, run: dict, snapshot=None) -> None:
    """Epsilon prediction on v1-4's noise schedule with DROP of captions emptied, on
    `latents` [N, 4, 8, 8] (their std 1 / scaling) and token `ids` [N, 77]; `run`: what
    the checkpoint must match; `snapshot(step)` runs after each checkpoint (the caller
    may keep that step's weights, to compare how long to train)."""
    from diffusers import DDPMScheduler

    from export.configs import SD14_SCHEDULER

    sched = DDPMScheduler(**{k: v for k, v in SD14_SCHEDULER.items()
                             if k not in ("skip_prk_steps", "set_alpha_to_one")})
    alphas = sched.alphas_cumprod.to(device)
    params = [*text.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    ckpt = out / "denoiser.pt"
    mods = {"text_encoder": text, "unet": unet}
    gen = torch.Generator().manual_seed(2000 + run["seed"])  # batches, dropout, t, noise
    start = checkpoint.resume(ckpt, mods, opt, gen, run, steps)
    text.to(device), unet.to(device)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, LR)
        pick = torch.randint(len(latents), (batch,), generator=gen)
        x0 = (latents[pick] * scaling).to(device)  # [B, 4, 8, 8], unit std
        tok = ids[pick].clone()  # [B, 77]
        tok[torch.rand(batch, generator=gen) < DROP] = empty  # unconditional
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(tok.to(device))[0]  # [B, 77, 32]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0:
            text.cpu(), unet.cpu()
            checkpoint.save(ckpt, mods, opt, gen, step + 1, run)
            if snapshot is not None:
                snapshot(step + 1)
            text.to(device), unet.to(device)
    text.cpu(), unet.cpu()
    checkpoint.save(ckpt, mods, opt, gen, steps, run)


def token_ids(captions: list[str]) -> torch.Tensor:
    from runtime.bundle import demo_bundle
    from runtime.tokenizer import ClipTokenizer

    tok = ClipTokenizer(demo_bundle() / "tokenizer")
    return torch.from_numpy(tok.encode(captions)[0].astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo_model.train",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000, help="text encoder + UNet steps")
    p.add_argument("--batch", type=int, default=64, help="text encoder + UNet batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also write weights-STEP.safetensors this often (0: never)")
    p.add_argument("--dataset", type=int, default=DATASET, help="pictures drawn once")
    a = p.parse_args(argv)
    try:
        return train(a)
    except checkpoint.TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(a: argparse.Namespace) -> int:
    for name in ("vae_steps", "vae_batch", "steps", "batch", "save_every", "dataset"):
        if getattr(a, name) < 1:
            raise checkpoint.TrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if a.snapshot_every < 0 or a.snapshot_every % a.save_every:
        raise checkpoint.TrainingError(f"--snapshot-every must be 0 or a multiple of "
                                       f"--save-every ({a.save_every}): snapshots are taken "
                                       f"at checkpoints")
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text, unet, vae = components()
    images, captions = dataset(a.seed, a.dataset)
    x = to_tensor(images)
    print(f"dataset: {len(images)} pictures in {time.perf_counter() - t0:.1f} s")
    run = {"seed": a.seed, "dataset": a.dataset}
    train_vae(vae, x, a.out, a.vae_steps, a.vae_batch, a.device, a.save_every,
              {**run, "batch": a.vae_batch})
    report_vae(vae, a.seed)
    latents = rescale_latents(vae, x)
    ids, empty = token_ids(captions), token_ids([""])[0]

    # the denoiser learns these latents: a resume must be on the same VAE
    run = {**run, "batch": a.batch, "vae_steps": a.vae_steps, "vae_batch": a.vae_batch}
    made_by = {k: str(v) for k, v in {**run, "steps": a.steps, "jitter": JITTER, "anchor": ANCHOR,
                                      "drop": DROP, "lr": LR, "vae_lr": VAE_LR}.items()}

    def snapshot(step: int) -> None:
        if a.snapshot_every and step % a.snapshot_every == 0:
            save_weights(a.out / f"weights-{step}.safetensors", text, unet, vae, ids,
                         {**made_by, "steps": str(step)})

    train_denoiser(text, unet, latents, ids, empty, a.out, a.steps, a.batch, a.device,
                   a.save_every, vae.config.scaling_factor, run, snapshot)
    save_weights(a.out / "weights.safetensors", text, unet, vae, ids, made_by)
    bundle = export_trained(a.out / "weights.safetensors", a.out / "bundle")
    print(f"wrote {a.out / 'weights.safetensors'} and {bundle} in "
          f"{(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def load_weights(path: Path):
    """Text encoder, UNet and VAE of config() with the weights of a save_weights file."""
    text, unet, vae = components()
    weights.load(path, {"text_encoder": text, "unet": unet, "vae": vae})
    return text, unet, vae


def export_trained(path: Path, out: Path) -> Path:
    """The bundle of these weights (the safety checker random, never flagging)."""
    import dataclasses

    from export.bundle_writer import export_bundle
    from export.components import build_components

    return export_bundle(build_components(dataclasses.replace(config(), weights=str(path.resolve()))),
                         out, force=True, log=lambda line: None)


def save_weights(path: Path, text, unet, vae, ids: torch.Tensor, made_by: dict[str, str]) -> None:
    """fp16 safetensors of the three modules, the token table cut to the captions' rows
    (weights.py): the only rows ever trained; `made_by`: the run's settings, kept in the
    file's metadata."""
    weights.save(path, {"text_encoder": text, "unet": unet, "vae": vae}, ids, made_by)


if __name__ == "__main__":
    raise SystemExit(main())

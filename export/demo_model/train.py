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
demo should show what guidance does. Pairs in HELD_OUT are never shown, so the test can
ask for new combinations.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from export.demo_model import shapes, weights

HELD_OUT = frozenset({("red", "star"), ("blue", "triangle"), ("yellow", "circle"),
                      ("green", "square")})  # (colour, shape) never drawn in training
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
    return shapes.batch(np.random.default_rng(seed), n, HELD_OUT, JITTER)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cosine(step: int, total: int, lr: float) -> float:
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def _resume(path: Path, modules: dict, opt: torch.optim.Optimizer) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, m in modules.items():
        m.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _save(path: Path, modules: dict, opt: torch.optim.Optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({**{n: m.state_dict() for n, m in modules.items()}, "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "step": step}, tmp)
    tmp.replace(path)  # a run killed mid-save keeps the last checkpoint


def train_vae(vae, images: torch.Tensor, out: Path, steps: int, batch: int, device: str,
              save_every: int) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    ckpt = out / "vae.pt"
    start = _resume(ckpt, {"vae": vae}, opt)
    vae.to(device)
    gen = torch.Generator().manual_seed(1000 + start)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, VAE_LR)
        x = images[torch.randint(len(images), (batch,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
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
            _save(ckpt, {"vae": vae}, opt, step + 1)
            vae.to(device)
    vae.cpu()
    _save(ckpt, {"vae": vae}, opt, steps)


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
                   scaling: float, snapshot=None) -> None:
    """Epsilon prediction on v1-4's noise schedule with DROP of captions emptied;
    `snapshot(step)` runs after each checkpoint (the caller may keep that step's weights,
    to compare how long to train)."""
    from diffusers import DDPMScheduler

    from export.configs import SD14_SCHEDULER

    sched = DDPMScheduler(**{k: v for k, v in SD14_SCHEDULER.items()
                             if k not in ("skip_prk_steps", "set_alpha_to_one")})
    alphas = sched.alphas_cumprod.to(device)
    params = [*text.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    ckpt = out / "denoiser.pt"
    mods = {"text_encoder": text, "unet": unet}
    start = _resume(ckpt, mods, opt)
    text.to(device), unet.to(device)
    gen = torch.Generator().manual_seed(2000 + start)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, LR)
        pick = torch.randint(len(latents), (batch,), generator=gen)
        x0 = (latents[pick] * scaling).to(device)
        tok = ids[pick].clone()
        tok[torch.rand(batch, generator=gen) < DROP] = empty  # unconditional
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(tok.to(device))[0]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0:
            text.cpu(), unet.cpu()
            _save(ckpt, mods, opt, step + 1)
            if snapshot is not None:
                snapshot(step + 1)
            text.to(device), unet.to(device)
    text.cpu(), unet.cpu()
    _save(ckpt, mods, opt, steps)


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
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text, unet, vae = components()
    images, captions = dataset(a.seed, a.dataset)
    x = to_tensor(images)
    print(f"dataset: {len(images)} pictures in {time.perf_counter() - t0:.1f} s")
    train_vae(vae, x, a.out, a.vae_steps, a.vae_batch, a.device, a.save_every)
    report_vae(vae, a.seed)
    latents = rescale_latents(vae, x)
    ids, empty = token_ids(captions), token_ids([""])[0]

    def snapshot(step: int) -> None:
        if a.snapshot_every and step % a.snapshot_every == 0:
            save_weights(a.out / f"weights-{step}.safetensors", text, unet, vae, ids)

    train_denoiser(text, unet, latents, ids, empty, a.out, a.steps, a.batch, a.device,
                   a.save_every, vae.config.scaling_factor, snapshot)
    save_weights(a.out / "weights.safetensors", text, unet, vae, ids)
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


def save_weights(path: Path, text, unet, vae, ids: torch.Tensor) -> None:
    """fp16 safetensors of the three modules, the token table cut to the captions' rows
    (weights.py): the only rows ever trained."""
    weights.save(path, {"text_encoder": text, "unet": unet, "vae": vae}, ids)


if __name__ == "__main__":
    raise SystemExit(main())

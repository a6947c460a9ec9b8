"""Input shape profiles for a graph: dynamic (min/opt/max) or static (min = opt = max).

Shapes come from runtime.bundle.Profile.shapes(spec), so their rules (the UNet's min
batch is B without guidance, opt/max are 2B with it) are written once, there.
"""

from __future__ import annotations

from runtime import cache
from runtime.bundle import GraphSpec, Profile


def static_shapes(spec: GraphSpec, profile: Profile) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes at the profile's opt values, with guidance (UNet N = 2B)."""
    rows = profile.shapes(spec)
    return {name: tuple(row["opt"]) for name, row in rows.items()}


# Graphs kept dynamic under --static: the text encoder runs prompts and negative prompts
# in one call (batch 2B with guidance, B without) and costs 0.03 TFLOP of the 83 per image;
# the VAE encoder runs one image at a time (img2img, inpainting), whatever the batch.
ALWAYS_DYNAMIC = ("text_encoder", "vae_encoder")


def graph_profile(spec: GraphSpec, profile: Profile, static: Profile | None) -> dict:
    """{input: {"min", "opt", "max": [dims]}} for the builder and the cache key: the
    `static` shape when given (except ALWAYS_DYNAMIC graphs), else `profile`."""
    if static is not None and spec.name not in ALWAYS_DYNAMIC:
        return cache.static_profile(spec, static_shapes(spec, static))
    return profile.shapes(spec)


def describe(profile: Profile, static: Profile | None) -> str:
    """One short line for progress output."""
    if static is not None:
        return (f"static B={static.batch[1]} {static.height[1]}x{static.width[1]} "
                f"({', '.join(ALWAYS_DYNAMIC)} dynamic)")
    b, h, w, t = profile.batch, profile.height, profile.width, profile.tokens
    return (f"dynamic B {b[0]}..{b[2]}, H {h[0]}..{h[2]}, W {w[0]}..{w[2]}, text tokens "
            f"{t[0]}..{t[2]} (opt B={b[1]} {h[1]}x{w[1]})")

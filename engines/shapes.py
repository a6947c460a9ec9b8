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


def graph_profile(spec: GraphSpec, profile: Profile, static: bool) -> dict:
    """{input: {"min", "opt", "max": [dims]}} for the builder and the cache key."""
    if static:
        return cache.static_profile(spec, static_shapes(spec, profile))
    return profile.shapes(spec)


def describe(profile: Profile, static: bool) -> str:
    """One short line for progress output."""
    if static:
        return f"static B={profile.batch[1]} {profile.height[1]}x{profile.width[1]}"
    b, h, w = profile.batch, profile.height, profile.width
    return (f"dynamic B {b[0]}..{b[2]}, H {h[0]}..{h[2]}, W {w[0]}..{w[2]} "
            f"(opt B={b[1]} {h[1]}x{w[1]})")

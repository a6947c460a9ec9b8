"""Captioned pictures of one shape on a plain background, made in code from a seed, and
the pixel-statistics judge that says which colour and shape a picture shows.

    "a red circle on a blue background"  ->  64x64 RGB, a red disc on blue

Shapes are chosen so that two numbers tell them apart: how much of its bounding box the
shape fills (square 1.0, circle 0.79, triangle 0.5, five-pointed star 0.38) and, for the
last two, where it is widest (a triangle at its base, a star at its arms). Colours are
8 well-separated ones; the background is always another colour than the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # px, square
COLOURS = {  # RGB, far apart from each other
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (240, 220, 40), "purple": (140, 50, 180), "orange": (245, 140, 20),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "star": 0.38}  # of the bbox
STAR_INNER = 0.45  # inner / outer radius: points wide enough to survive 8x8 latents
SUPERSAMPLE = 4  # drawn this much larger, then averaged down: smooth edges
HELD_OUT = frozenset({("red", "star"), ("blue", "triangle"), ("yellow", "circle"),
                      ("green", "square")})  # (colour, shape) never drawn in training


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre, px
    cy: float
    r: float  # half the shape's extent, px
    jitter: tuple[int, ...] = (0,) * 6  # added to the shape's, then the background's RGB

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def random_scene(rng: np.random.Generator, shape: str | None = None,
                 colour: str | None = None, jitter: int = 0) -> Scene:
    """A scene; with `jitter`, both colours move up to that much per channel (training
    pictures: the model sees a neighbourhood of each colour, not one point, so guidance's
    overshoot lands somewhere it knows). At 24 the farthest corner (41.6) is a little past
    half the yellow-orange distance (41.3): a rare jittered yellow is nearer orange."""
    names = list(COLOURS)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or names[rng.integers(len(names))]
    background = [c for c in names if c != colour][rng.integers(len(names) - 1)]
    r = float(rng.uniform(17, 24))
    cx, cy = (float(SIZE / 2 + rng.uniform(-5, 5)) for _ in range(2))
    shift = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, 6)) if jitter else (0,) * 6
    return Scene(shape, colour, background, cx, cy, r, shift)


def _rgb(name: str, shift: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + d)) for c, d in zip(COLOURS[name], shift, strict=True))


def _polygon(scene: Scene, s: float) -> list[tuple[float, float]]:
    cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
    if scene.shape == "triangle":  # upright, base as wide as it is tall
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    points = []  # star: 10 corners, outer ones at -90 + 72k degrees
    for k in range(10):
        rad = r if k % 2 == 0 else r * STAR_INNER
        a = math.radians(-90 + 36 * k)
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return points


def draw(scene: Scene) -> np.ndarray:
    """The scene as uint8 [SIZE, SIZE, 3]."""
    s = SUPERSAMPLE
    im = Image.new("RGB", (SIZE * s, SIZE * s), _rgb(scene.background, scene.jitter[3:]))
    d = ImageDraw.Draw(im)
    fill = _rgb(scene.colour, scene.jitter[:3])
    box = [(scene.cx - scene.r) * s, (scene.cy - scene.r) * s,
           (scene.cx + scene.r) * s, (scene.cy + scene.r) * s]
    if scene.shape == "circle":
        d.ellipse(box, fill=fill)
    elif scene.shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon(_polygon(scene, s), fill=fill)
    return np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BOX))


def batch(rng: np.random.Generator, n: int, skip: frozenset[tuple[str, str]] = frozenset(),
          jitter: int = 0) -> tuple[np.ndarray, list[str]]:
    """n pictures [n, SIZE, SIZE, 3] uint8 and their captions; (colour, shape) pairs in
    `skip` are never drawn (held out: the model must combine words it saw apart)."""
    images, captions = [], []
    while len(images) < n:
        scene = random_scene(rng, jitter=jitter)
        if (scene.colour, scene.shape) in skip:
            continue
        images.append(draw(scene))
        captions.append(scene.caption)
    return np.stack(images), captions


@dataclass(frozen=True)
class Verdict:
    colour: str  # nearest palette colour of the foreground
    shape: str  # by how much of its bounding box the foreground fills
    fill: float
    foreground: float  # share of the picture that is foreground
    widest: float = 0.0  # where the foreground is widest: 0 its top row, 1 its bottom


def judge(image: np.ndarray) -> Verdict:
    """Colour and shape of the one thing on a plain background in `image` [H, W, 3]
    uint8, any size: the background is the border's median colour, the foreground every
    pixel far from it; its fill of its bounding box and where it is widest name the
    shape. No learned judge."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    # candidates: far from the background (half the closest pair, yellow-orange: 83);
    # the foreground colour is their median, and a pixel is foreground when it is nearer
    # that than the background (edges and halos split between the two)
    far = np.linalg.norm(img - bg, axis=-1) > 40
    if far.sum() < 0.01 * h * w:
        return Verdict("none", "none", 0.0, float(far.mean()))
    fg = np.median(img[far], axis=0)
    mask = np.linalg.norm(img - fg, axis=-1) < np.linalg.norm(img - bg, axis=-1)
    share = float(mask.mean())
    palette = np.array(list(COLOURS.values()), np.float32)
    colour = list(COLOURS)[int(np.argmin(np.linalg.norm(palette - fg, axis=1)))]
    ys, xs = np.nonzero(mask)
    top, bottom = ys.min(), ys.max()
    box = (bottom - top + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    # where it is widest, 0 at its top, 1 at its bottom: a triangle at its base, a star
    # at its arms (0.38), whatever rounding its points got
    widths = mask[top:bottom + 1].sum(axis=1)
    widest = float(np.flatnonzero(widths >= 0.95 * widths.max()).mean() / max(1, bottom - top))
    shape = ("square" if fill > 0.89 else "circle" if fill > 0.64  # between their fills
             else "triangle" if widest > 0.7 else "star")
    return Verdict(colour, shape, fill, share, widest)

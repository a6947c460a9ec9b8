"""The safety checker's verdict on the host, exactly as diffusers decides it.

StableDiffusionPipeline calls StableDiffusionSafetyChecker.forward, which (per image)
rounds every score to 3 decimals before comparing it with 0, and adds 0.01 to every
concept score when any special-care score (rounded) is above 0. Its forward_onnx
(what a traced graph computes) does not round, so a score in (0, 0.0005) flagged an
image there that diffusers lets through. The graph returns the raw scores (cosine
minus threshold, float32) and this applies forward's rule in the same float32
arithmetic: numpy 2 computes `np.float32 - float + float` in float32, as forward does.
"""

from __future__ import annotations

import numpy as np

ADJUSTMENT = np.float32(0.01)  # forward's `adjustment` once a special-care score is > 0


def nsfw_flags(concept: np.ndarray, special: np.ndarray) -> list[bool]:
    """Per image: flagged or not. concept [B, 17], special [B, 3]: cosine - threshold."""
    concept = np.asarray(concept, np.float32)
    special = np.asarray(special, np.float32)
    # forward adds the adjustment to later special scores once one is > 0: that cannot
    # change whether any is, so the first test needs none
    care = (np.round(special, 3) > 0).any(axis=1)  # [B]
    adjusted = concept + np.where(care, ADJUSTMENT, np.float32(0))[:, None]  # [B, 17] float32
    return [bool(f) for f in (np.round(adjusted, 3) > 0).any(axis=1)]


def flags_from_outputs(out: dict[str, np.ndarray]) -> list[bool]:
    """The checker graph's outputs -> flags; a bundle from before special_scores has
    only forward_onnx's unrounded flags."""
    if "special_scores" in out:
        return nsfw_flags(out["concept_scores"], out["special_scores"])
    return [bool(f) for f in out["has_nsfw"]]

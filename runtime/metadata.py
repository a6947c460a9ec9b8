"""What a PNG says about how it was made: our own keys, and AUTOMATIC1111's `parameters`
text, which image browsers, civitai and A1111's "PNG Info" tab read:

    a red apple, (shiny:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: demo, ...
"""

from __future__ import annotations

import json

# our scheduler -> A1111's sampler name (PNDM has none there: PLMS is PNDM without its
# Runge-Kutta warm-up, which diffusers' v1 config skips too, so "PLMS" is what it is)
A1111_SAMPLERS = {
    "pndm": "PLMS",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def _value(v: str) -> str:
    """A1111's quote(): a value holding a comma, colon or newline as a JSON string."""
    return json.dumps(v, ensure_ascii=False) if any(c in v for c in ",:\n") else v


def parameters_text(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """A1111's infotext: the prompt, `Negative prompt: ...` when there is one, then
    `Key: value` pairs on one line in the order given (None values left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)

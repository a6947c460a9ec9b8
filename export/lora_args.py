"""`--lora FILE[:SCALE]`, parsed before torch is imported (a typo costs a second)."""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError


def parse_lora(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE (scale 1.0 by default); a path may itself hold colons."""
    path, _, scale = text.rpartition(":")
    if path:
        try:
            value = float(scale)
        except ValueError:
            path, value = text, 1.0  # the colon was part of the path
    else:
        path, value = text, 1.0
    if not -100 <= value <= 100:  # NaN fails too
        raise ExportError(f"--lora {text}: the scale must be a number in [-100, 100]")
    return Path(path), value

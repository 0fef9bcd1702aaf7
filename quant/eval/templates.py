"""Prompt templates for zero-shot classification.

The default is the 18-template ensemble OpenAI's CLIP used for CIFAR-10 (also CLIP_benchmark's
``cifar10`` templates). A template holds one placeholder, ``{}`` or ``{c}``, for the class name.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from clipfp8.quant.core.errors import DatasetError

CIFAR10_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
DEFAULT_TEMPLATES = CIFAR10_TEMPLATES


def fill(template: str, classname: str) -> str:
    """``template`` with its ``{}``/``{c}`` placeholder replaced by ``classname``."""
    return template.replace("{c}", classname).replace("{}", classname)


def validate_templates(templates: Sequence[str], source: str = "templates") -> tuple[str, ...]:
    """Non-empty, each with exactly one placeholder; raises ``DatasetError`` naming ``source``."""
    out = tuple(t.strip() for t in templates if t.strip())
    if not out:
        raise DatasetError(f"{source}: no prompt template")
    bad = [t for t in out if t.count("{}") + t.count("{c}") != 1]
    if bad:
        raise DatasetError(f"{source}: each template needs exactly one '{{}}' or '{{c}}' placeholder, "
                           f"bad: {bad[:3]}")
    return out


def load_templates(path: Path) -> tuple[str, ...]:
    """Templates from a ``.json`` list of strings, or a text file with one template per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"templates file {path}: cannot read it ({e})") from e
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"templates file {path}: invalid JSON ({e})") from e
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise DatasetError(f"templates file {path}: expected a JSON list of strings")
        return validate_templates(raw, f"templates file {path}")
    return validate_templates(text.splitlines(), f"templates file {path}")


__all__ = ["CIFAR10_TEMPLATES", "DEFAULT_TEMPLATES", "fill", "validate_templates", "load_templates"]

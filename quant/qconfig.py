"""``QuantConfig``: what to quantize, as self-validating data. Its own module so that the PTQ
driver (``quant.ptq``), the audit (``quant.audit``) and the checkpoint all read one definition and
none of them imports another to get it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOWERS = ("image", "text")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize. Format, granularity and calibration are fixed (FP8 E4M3, per-tensor,
    static, ``max``); they are fields so the saved config says what was done.

    ``exclude``: fnmatch patterns over module names (e.g. ``"visual.conv1"``,
    ``"visual.transformer.resblocks.0*"``); every quantizer of a matching module stays disabled.
    ``quantize_attention``: quantize Q/K/V and softmax inputs of the attention matmuls.
    ``towers``: which towers to quantize (``"image"``, ``"text"``).
    """

    exclude: tuple[str, ...] = ("visual.conv1",)
    quantize_attention: bool = True
    towers: tuple[str, ...] = TOWERS
    format: str = "fp8_e4m3"
    granularity: str = "per-tensor"
    calibration: str = "max"
    static: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "towers", tuple(self.towers))
        fixed = {"format": "fp8_e4m3", "granularity": "per-tensor", "calibration": "max", "static": True}
        for key, want in fixed.items():
            if getattr(self, key) != want:
                raise ValueError(f"QuantConfig.{key} must be {want!r} (only FP8 E4M3 per-tensor static "
                                 f"max is supported), got {getattr(self, key)!r}")
        for pat in self.exclude:
            if not isinstance(pat, str) or not pat.strip():
                raise ValueError(f"QuantConfig.exclude: patterns must be non-empty strings, got {pat!r}")
        if not self.towers or any(t not in TOWERS for t in self.towers) or len(set(self.towers)) != len(self.towers):
            raise ValueError(f"QuantConfig.towers must be a non-empty subset of {TOWERS}, got {self.towers!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"exclude": list(self.exclude), "quantize_attention": self.quantize_attention,
                "towers": list(self.towers), "format": self.format, "granularity": self.granularity,
                "calibration": self.calibration, "static": self.static}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantConfig: unknown keys {sorted(unknown)}")
        # JSON has no tuples: lists become the tuples the fields hold; __post_init__ checks the rest.
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


__all__ = ["QuantConfig", "TOWERS"]

"""The deterministic fake encoder lives in ``quant.core.testing`` (the CLI test hooks use it too)."""
from clipfp8.quant.core.testing import COLOURS, FakeEncoder

__all__ = ["FakeEncoder", "COLOURS"]

"""The deterministic fake encoder lives in ``quant.testing`` (the CLI test hooks use it too)."""
from quant.testing import COLOURS, FakeEncoder

__all__ = ["FakeEncoder", "COLOURS"]

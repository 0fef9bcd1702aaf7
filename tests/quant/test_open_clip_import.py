"""open_clip without transformers for models that need no Hugging Face text tower, and with it
again (in the same process) for one that does: fresh interpreters, as the import is process-wide."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipfp8.quant.core.open_clip_import import bundled_config, needs_transformers

pytest.importorskip("transformers", reason="the point is leaving an installed transformers out")

NON_HF_THEN_HF = """
import json, sys, torch
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
plain = load_model(ModelSpec(config=tiny_config()))
out = {"after_plain": "transformers" in sys.modules,
       "hf_model_fallback": sys.modules["open_clip.hf_model"].transformers is None}
torch.manual_seed(0)
hf = load_model(ModelSpec(config=tiny_config(hf_text=True)))
with torch.no_grad():
    out["text"] = hf.model.encode_text(hf.tokenizer(["a red car", "two dogs"])).tolist()
out["after_hf"] = "transformers" in sys.modules
out["text_tower"] = type(hf.model.text).__name__
out["same_class"] = type(hf.model.text) is sys.modules["open_clip.hf_model"].HFTextEncoder  # picklable by name
print(json.dumps(out))
"""

HF_ONLY = """
import json, torch
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
torch.manual_seed(0)
hf = load_model(ModelSpec(config=tiny_config(hf_text=True)))
with torch.no_grad():
    print(json.dumps({"text": hf.model.encode_text(hf.tokenizer(["a red car", "two dogs"])).tolist()}))
"""


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_model_leaves_transformers_out_and_a_later_hf_model_still_builds() -> None:
    got = _run(NON_HF_THEN_HF)
    assert got["after_plain"] is False and got["hf_model_fallback"] is True
    assert got["after_hf"] is True and got["text_tower"] == "HFTextEncoder" and got["same_class"] is True
    # The same seeded HF model as in a process that imported open_clip with transformers.
    assert got["text"] == _run(HF_ONLY)["text"]


def test_bundled_configs_are_read_without_importing_open_clip() -> None:
    import open_clip

    for name in ("ViT-L-14", "ViT-B-32", "xlm-roberta-base-ViT-B-32"):
        assert bundled_config(name) == open_clip.get_model_config(name), name
    assert not needs_transformers(bundled_config("ViT-L-14"))
    assert needs_transformers(bundled_config("xlm-roberta-base-ViT-B-32"))
    assert bundled_config("no-such-architecture") is None
    assert needs_transformers(None)  # unknown: import it as open_clip would

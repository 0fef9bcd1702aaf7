"""open_clip without transformers (timm) for models that need no Hugging Face text tower (timm
image tower), and with it again (in the same process) for one that does; torchvision's models and
ops run their ``__init__`` on first use. Fresh interpreters, as the import is process-wide."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipfp8.quant.core.open_clip_import import bundled_config, needs_timm, needs_transformers

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


TIMM_CFG = ("{'embed_dim': 32, 'vision_cfg': {'timm_model_name': 'resnet18', 'timm_model_pretrained': False, "
            "'timm_pool': 'avg', 'timm_proj': 'mlp', 'image_size': 32}, 'text_cfg': tiny_config()['text_cfg']}")

PLAIN_THEN_TIMM = """
import json, sys, torch
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
plain = load_model(ModelSpec(config=tiny_config()))
out = {"timm": "timm" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
       "vision_models": "torchvision.models" in sys.modules,
       "timm_model_fallback": sys.modules["open_clip.timm_model"].timm is None}
torch.manual_seed(0)
m = load_model(ModelSpec(config=TIMM_CFG))
with torch.no_grad():
    out["image"] = m.model.encode_image(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)).tolist()
out["trunk"] = type(m.model.visual.trunk).__name__
out["mlp_class"] = type(m.model.visual.head.mlp).__module__
print(json.dumps(out))
""".replace("TIMM_CFG", TIMM_CFG)

TIMM_ONLY = """
import json, torch
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
torch.manual_seed(0)
m = load_model(ModelSpec(config=TIMM_CFG))
with torch.no_grad():
    print(json.dumps({"image": m.model.encode_image(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)).tolist()}))
""".replace("TIMM_CFG", TIMM_CFG)


def test_plain_model_leaves_timm_out_and_a_later_timm_tower_still_builds() -> None:
    pytest.importorskip("timm", reason="the point is leaving an installed timm out")
    got = _run(PLAIN_THEN_TIMM)
    # Neither timm nor torch._dynamo (which timm and torchvision.ops import) for a plain model.
    assert got["timm"] is False and got["dynamo"] is False and got["timm_model_fallback"] is True
    assert got["trunk"] == "ResNet" and got["mlp_class"].startswith("timm.")  # the bound timm.layers.Mlp
    # The same seeded timm tower as in a process that imported open_clip with timm.
    assert got["image"] == _run(TIMM_ONLY)["image"]


DEFERRED_TORCHVISION = """
import json, sys, torch
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
loaded = load_model(ModelSpec(config=tiny_config()))
from PIL import Image
x = loaded.preprocess(Image.new("RGB", (40, 30), (200, 10, 10)))  # torchvision.transforms, not deferred
out = {"before": {n: type(sys.modules.get(n)).__name__ for n in ("torchvision.ops", "torchvision.models")},
       "dynamo_before": "torch._dynamo" in sys.modules, "pixel": x.shape[-1]}
import torchvision
from torchvision.ops import box_iou  # the first lookup runs ops' __init__
out["iou"] = box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.]])).item()
out["nms"] = torchvision.ops.nms(torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 2.1]]), torch.tensor([0.9, 0.8]), 0.5).tolist()
out["resnet"] = type(torchvision.models.resnet18()).__name__
out["dynamo_after"] = "torch._dynamo" in sys.modules
print(json.dumps(out))
"""


def test_torchvision_ops_and_models_run_their_init_on_first_use() -> None:
    got = _run(DEFERRED_TORCHVISION)
    assert got["before"] == {"torchvision.ops": "DeferredPackage", "torchvision.models": "DeferredPackage"}
    assert got["dynamo_before"] is False and got["pixel"] == 32
    assert got["iou"] == pytest.approx(1 / 7) and got["nms"] == [0]
    assert got["resnet"] == "ResNet" and got["dynamo_after"] is True


def test_timm_towers_are_recognised() -> None:
    assert not needs_timm(bundled_config("ViT-L-14"))
    assert needs_timm(bundled_config("ViT-B-16-SigLIP"))  # a timm image tower in open_clip's configs
    assert needs_timm(None)


def test_transformers_imported_beside_open_clip_still_sees_timm() -> None:
    pytest.importorskip("timm")
    code = ("import json; from clipfp8.quant.core.open_clip_import import import_open_clip\n"
            "import_open_clip(hf=True, timm=False)\n"
            "from transformers.utils import is_timm_available\n"
            "print(json.dumps({'timm': is_timm_available()}))")
    assert _run(code) == {"timm": True}

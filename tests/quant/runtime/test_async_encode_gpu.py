"""``FastTorchEncoder.encode_images_async`` on CUDA returns before the device is done and gives
exactly what ``encode_images`` gives, batch after batch (pinned host copies behind events)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_async_equals_sync_on_cuda() -> None:
    from clipfp8.quant.core.models import build_from_config, tiny_config
    from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder

    torch.manual_seed(0)
    model = build_from_config(tiny_config()).to("cuda", torch.float16).eval()
    enc = FastTorchEncoder(model, lambda im: im, lambda t: torch.zeros(len(t), 8, dtype=torch.long),
                           precision="fp16", device="cuda", name="tiny-fp16", model_id="tiny", checksum="x",
                           dim=32, image_size=(32, 32), batch_size=8, compile=False)
    batches = [torch.randn(n, 3, 32, 32, device="cuda") for n in (8, 5, 8)]
    pending = [enc.encode_images_async(b) for b in batches]  # all queued before any is fetched
    for b, result in zip(batches, pending, strict=True):
        got, want = result(), enc.encode_images(b)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_warm_up_compiles_so_the_first_batch_does_not() -> None:
    from torch._dynamo.utils import counters

    from clipfp8.quant.core.models import build_from_config, tiny_config
    from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = build_from_config(tiny_config()).to("cuda", torch.float16).eval()
    enc = FastTorchEncoder(model, lambda im: im, lambda t: torch.zeros(len(t), 8, dtype=torch.long),
                           precision="fp16", device="cuda", name="tiny-fp16", model_id="tiny", checksum="x",
                           dim=32, image_size=(32, 32), batch_size=64, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert enc.warm_up_images(64) is True
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > graphs  # the image tower was compiled by the warm-up
    for n in (64, 40):  # the run's batch size, and a smaller tail batch: same dynamic graph
        out = enc.encode_images(torch.randn(n, 3, 32, 32, device="cuda"))
        assert out.shape == (n, 32)
    assert counters["stats"]["unique_graphs"] == compiled

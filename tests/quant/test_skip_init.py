"""``skip_weight_init``: a checkpoint loads into a model built without random init, equal to
the normal load, and init is back afterwards."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clipfp8.quant.core.models import build_from_config, load_safetensors_into, skip_weight_init, tiny_config


def test_checkpoint_loads_equal_without_random_init(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = build_from_config(tiny_config())
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with skip_weight_init():
        fresh = build_from_config(tiny_config())
    load_safetensors_into(fresh, path)
    want, got = ref.state_dict(), fresh.state_dict()
    assert set(want) == set(got)
    for k in want:  # persistent and non-persistent buffers (attention masks) included
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(ref.attn_mask, fresh.attn_mask)


def test_init_is_restored_and_disabled_context_inits() -> None:
    with skip_weight_init():
        t = torch.full((4,), 7.0)
        nn.init.zeros_(t)
        assert torch.equal(t, torch.full((4,), 7.0))  # a no-op inside
    t = torch.full((4,), 7.0)
    nn.init.zeros_(t)
    assert torch.equal(t, torch.zeros(4))  # restored after
    with skip_weight_init(enabled=False):
        nn.init.ones_(t)
    assert torch.equal(t, torch.ones(4))

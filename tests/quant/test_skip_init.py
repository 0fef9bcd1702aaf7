"""``skip_weight_init``: a checkpoint loads into a model built without random init, equal to
the normal load, and init is back afterwards."""
from __future__ import annotations

from pathlib import Path

import pytest
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


def test_attention_built_without_drawing_random_numbers() -> None:
    """``nn.MultiheadAttention`` binds ``xavier_uniform_`` by name in its own module: skipping
    init must reach it (it drew ViT-L/14's in-projections at every cold start), and give it back."""
    import torch.nn.modules.activation as activation

    original = activation.xavier_uniform_
    before = torch.random.get_rng_state()
    with skip_weight_init():
        assert activation.xavier_uniform_ is not original
        nn.MultiheadAttention(64, 4)
        nn.Linear(64, 64)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert activation.xavier_uniform_ is original
    nn.MultiheadAttention(64, 4)
    assert not torch.equal(torch.random.get_rng_state(), before)  # init is back


def test_explicit_attention_copies_weights_without_random_init() -> None:
    from clipfp8.quant.attention import ExplicitAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).to(torch.float64)
    before = torch.random.get_rng_state()
    new = ExplicitAttention.from_mha(mha)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert new.q_proj.weight.dtype == torch.float64
    q, k, v = mha.in_proj_weight.chunk(3)
    assert torch.equal(new.q_proj.weight, q) and torch.equal(new.v_proj.weight, v)
    assert torch.equal(new.out_proj.bias, mha.out_proj.bias)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    assert torch.allclose(new(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], atol=1e-10)


def test_overlapping_uses_restore_init_when_the_last_one_exits() -> None:
    """Threads may load checkpoints at once (A in, B in, A out, B out): init stays off while
    any use is open and is the real one afterwards, not whatever an entry happened to see."""
    import threading

    real = nn.init.normal_
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def a() -> None:
        with skip_weight_init():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with skip_weight_init():
            b_in.set()
            a_out.wait(5)
            seen["while_b_open"] = nn.init.normal_

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["while_b_open"] is not real  # A's exit did not turn init back on under B
    assert nn.init.normal_ is real


def test_a_library_imported_inside_keeps_the_real_init_functions() -> None:
    """transformers copies torch's init functions into a table when ``transformers.initialization``
    is first imported; imported inside the context it must not keep the no-ops."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    code = ("import torch, transformers\n"
            "from clipfp8.quant.core.models import skip_weight_init\n"
            "with skip_weight_init():\n"
            "    import transformers.initialization as ti\n"
            "assert ti.TORCH_INIT_FUNCTIONS['normal_'] is torch.nn.init.normal_, ti.TORCH_INIT_FUNCTIONS['normal_']\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

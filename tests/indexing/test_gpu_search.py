"""GPU search backends give the CPU's answers (run on a CUDA machine; skipped elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfp8.indexing import query as search_mod
from clipfp8.indexing.vectors import VectorIndex

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_backend_equals_cpu_faiss() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vec = VectorIndex.new(64, "Flat")
    vec.add(np.arange(100, 5100), x)
    q = x[[3, 77, 4000]] + 0.01
    cpu_scores, cpu_ids = vec.search(q, 10)
    gpu_scores, gpu_ids = search_mod.search_vectors(vec, q, 10)  # faiss-gpu or torch on CUDA
    np.testing.assert_array_equal(gpu_ids, cpu_ids)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    vec.remove(np.array([103]))  # the cached GPU copy follows changes
    assert 103 not in search_mod.search_vectors(vec, q[:1], 5)[1]

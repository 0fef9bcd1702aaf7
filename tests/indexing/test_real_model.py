"""One end-to-end run with a real (tiny, random-weight) open_clip model through TorchEncoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.query import search
from clipfp8.indexing.store import open_index
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.encoder import TorchEncoder
from clipfp8.quant.core.models import load_model, tiny_config
from tests.indexing.conftest import make_corpus


def _encoder(precision: str) -> TorchEncoder:
    import torch

    torch.manual_seed(0)
    loaded = load_model(ModelSpec(name="tiny", config=tiny_config()))
    return TorchEncoder(loaded.model, loaded.preprocess, loaded.tokenizer, precision=precision,
                        device="cpu", name=f"tiny-{precision}", model_id=loaded.spec.model_id(),
                        checksum=loaded.weights_checksum(), dim=loaded.embed_dim,
                        image_size=loaded.image_size, batch_size=8)


def test_tiny_open_clip_index_and_search(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    files = make_corpus(corpus, 12)
    encs = [_encoder("fp32"), _encoder("bf16")]
    s = index_corpus(corpus, tmp_path / "idx", encs, batch_size=5, workers=2)
    assert s.indexed == 12
    with open_index(tmp_path / "idx") as store:
        assert store.identity("tiny-fp32") == encs[0].identity()
        # the stored vectors are the model's embeddings of the files
        vec = store.vectors("tiny-fp32")
        ids = np.sort(vec.ids())
        paths = store.id_paths(ids)
        want = encs[0].encode_pil([Image.open(corpus / paths[int(i)]) for i in ids])
        np.testing.assert_allclose(vec.reconstruct(ids), want, atol=1e-4)
        # an image finds itself first; text search returns k ranked hits
        hit = search(store, encs[0], Image.open(files[7]), k=3)
        assert hit[0].path == str(files[7].relative_to(corpus)) and hit[0].score > 0.999
        hits = search(store, encs[1], "a photo of a dog", k=4)
        assert len(hits) == 4 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

"""Incremental runs: add, change, delete, rename; several encoders in one pass."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.store import open_index
from tests.fakes import FakeEncoder
from tests.indexing.conftest import encoders, index_state, make_corpus, write_image


def _ids_by_path(index_dir: Path) -> dict[str, int]:
    with open_index(index_dir) as store:
        return {r["path"]: r["id"] for r in store.db.query("SELECT id, path FROM images")}


def test_first_run_indexes_everything_with_all_encoders(corpus: Path, tmp_path: Path) -> None:
    encs = encoders()
    s = index_corpus(corpus, tmp_path / "idx", encs, batch_size=4, workers=2)
    assert s.indexed == 10 and s.skipped == {}
    assert [e.calls["images"] for e in encs] == [10, 10]  # one pass, each image once per encoder
    with open_index(tmp_path / "idx") as store:
        assert store.encoder_names() == ["fake-fp16", "fake-fp8-fake"]
        for enc in encs:
            vec = store.vectors(enc.name)
            assert sorted(vec.ids().tolist()) == list(range(1, 11))
        # the stored vector is the encoder's embedding of the file
        row = next(iter(store.db.query("SELECT id, path FROM images WHERE id=3")))
        from PIL import Image
        want = FakeEncoder().encode_pil([Image.open(corpus / row["path"])])[0]
        np.testing.assert_allclose(store.vectors("fake-fp16").reconstruct(np.array([3]))[0], want, atol=1e-6)


def test_second_run_without_changes_embeds_nothing(corpus: Path, tmp_path: Path) -> None:
    index_corpus(corpus, tmp_path / "idx", encoders(), workers=1)
    encs = encoders()
    s = index_corpus(corpus, tmp_path / "idx", encs, workers=1)
    assert (s.indexed, s.unchanged, s.removed, s.moved) == (0, 10, 0, 0)
    assert encs[0].calls["images"] == 0


def test_add_change_delete_rename(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), batch_size=3, workers=2)
    before = _ids_by_path(idx)
    write_image(corpus / "d0" / "new.png", 100)                       # add
    write_image(corpus / "d1" / "img001.png", 101)                    # change content
    os.utime(corpus / "d0" / "img002.png", ns=(1, 10**18))            # touch only
    (corpus / "d1" / "img003.png").unlink()                           # delete
    (corpus / "moved").mkdir()
    shutil.move(corpus / "d0" / "img004.png", corpus / "moved" / "renamed.png")  # rename
    encs = encoders()
    s = index_corpus(corpus, idx, encs, batch_size=3, workers=2)
    assert (s.indexed, s.updated, s.removed, s.moved) == (2, 1, 1, 1)
    assert encs[0].calls["images"] == 2                               # the new and the changed file only
    after = _ids_by_path(idx)
    assert after["moved/renamed.png"] == before["d0/img004.png"]      # a move keeps its id and vector
    assert after["d1/img001.png"] == before["d1/img001.png"]          # a change keeps its id
    assert "d1/img003.png" not in after and "d0/img004.png" not in after
    # the result equals a clean index of the new corpus, vector for vector (ids aside)
    index_corpus(corpus, tmp_path / "clean", encoders(), workers=1)
    got, clean = index_state(idx), index_state(tmp_path / "clean")
    assert [i for i, *_ in got["rows"]] == got["fake-fp8-fake"][0]
    for name in ("fake-fp16",):
        path_of = {i: p for i, p, *_ in got["rows"]}
        clean_path_of = {i: p for i, p, *_ in clean["rows"]}
        mine = {path_of[i]: v for i, v in zip(*got[name], strict=False)}
        theirs = {clean_path_of[i]: v for i, v in zip(*clean[name], strict=False)}
        assert mine.keys() == theirs.keys()
        for p in mine:
            np.testing.assert_allclose(mine[p], theirs[p], atol=1e-4)


def test_renamed_copy_with_original_kept_is_embedded(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    shutil.copy(corpus / "d0" / "img000.png", corpus / "copy.png")    # same hash, source still there
    s = index_corpus(corpus, idx, encoders(), workers=1)
    assert (s.indexed, s.moved) == (1, 0)
    assert len(_ids_by_path(idx)) == 11


def test_two_renames_of_identical_files(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    write_image(corpus / "a.png", 7)
    shutil.copy(corpus / "a.png", corpus / "b.png")
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=2)
    (corpus / "a.png").rename(corpus / "x.png")
    (corpus / "b.png").rename(corpus / "y.png")
    s = index_corpus(corpus, idx, encoders(), workers=2)
    # One row per content hash is kept: one rename is a move, the identical twin is re-embedded.
    assert (s.moved, s.indexed, s.removed) == (1, 1, 1)
    assert sorted(_ids_by_path(idx)) == ["x.png", "y.png"]


def test_new_encoder_added_later_embeds_existing_images(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, [FakeEncoder()], workers=1)
    encs = encoders()
    s = index_corpus(corpus, idx, encs, workers=1)
    assert encs[0].calls["images"] == 0 and encs[1].calls["images"] == 10
    assert s.indexed == 10
    with open_index(idx) as store:
        assert store.vectors("fake-fp8-fake").ntotal == 10 == store.vectors("fake-fp16").ntotal


def test_ivf_factory_trains_once_large_enough_and_stays_correct(tmp_path: Path) -> None:
    from clipfp8.indexing.config import IndexConfig

    corpus = tmp_path / "c"
    make_corpus(corpus, 24)
    cfg = IndexConfig(workers=1, factory="IVF2,Flat", train_min=20, commit_every=8)
    index_corpus(corpus, tmp_path / "idx", encoders(), config=cfg)
    with open_index(tmp_path / "idx") as store:
        assert store.stats()["encoders"]["fake-fp16"]["index_type"] == "ivf"
        assert sorted(store.vectors("fake-fp16").ids().tolist()) == list(range(1, 25))
    (corpus / "d0" / "img000.png").unlink()
    index_corpus(corpus, tmp_path / "idx", encoders(), config=cfg)
    with open_index(tmp_path / "idx") as store:
        assert sorted(store.vectors("fake-fp16").ids().tolist()) == list(range(2, 25))


def test_unreadable_folder_keeps_its_indexed_images(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """Nothing already stored is lost when a folder cannot be listed (permissions, a dropped mount)."""
    import clipfp8.indexing.scan
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = _ids_by_path(idx)
    real_scandir = os.scandir

    def failing_scandir(path):  # root can read chmod-000 folders, so simulate the failure
        if os.fsdecode(path).endswith(os.sep + "d1"):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(clipfp8.indexing.scan.os, "scandir", failing_scandir)
    s = index_corpus(corpus, idx, encoders(), workers=1)
    assert s.removed == 0 and s.moved == 0 and s.indexed == 0
    after = _ids_by_path(idx)
    assert {p: i for p, i in after.items() if p != "d1"} == before  # every d1/ image kept, same ids
    with open_index(idx) as store:
        err = next(iter(store.db.query("SELECT status, error FROM images WHERE path = 'd1'")))
    assert err["status"] == "error" and "unreadable_dir" in err["error"]

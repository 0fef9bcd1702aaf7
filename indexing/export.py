"""Export one encoder's embeddings with their metadata to Parquet (clip-retrieval style)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfp8.indexing.atomic import atomic_write_bytes
from clipfp8.indexing.errors import IndexCorruptError, QueryError
from clipfp8.indexing.store import IndexStore

META_COLUMNS = ("size", "mtime_ns", "sha256", "width", "height")


def export_parquet(store: IndexStore, encoder_name: str, output: str | Path) -> int:
    """Write ``output`` (atomically): one row per embedded image, ordered by id, with columns
    ``id`` int64, ``image_path`` string (relative to the corpus root), ``embedding``
    list<float32> (D values), ``size``, ``mtime_ns``, ``sha256``, ``width``, ``height``,
    ``encoder``. Returns the number of rows."""
    output = Path(output)
    if output.suffix != ".parquet":
        raise QueryError(f"--output {output}: the file name must end in .parquet")
    if not output.parent.is_dir():
        raise QueryError(f"--output {output}: directory {output.parent} does not exist")
    vec = store.vectors(encoder_name)
    ids = np.sort(vec.ids())
    emb = vec.reconstruct(ids).astype(np.float32) if len(ids) else np.zeros((0, vec.dim), np.float32)
    rows = {r["id"]: r for r in store.db.query("SELECT * FROM images WHERE status='ok'")}
    cols: dict[str, list] = {"id": [], "image_path": [], **{c: [] for c in META_COLUMNS}}
    orphans = [i for i in ids.tolist() if i not in rows]
    if orphans:
        raise IndexCorruptError(f"{store.index_dir}: encoder {encoder_name!r} holds {len(orphans)} vectors with no "
                                f"indexed image row (e.g. id {orphans[0]}); run `clipfp8 verify --repair`")
    for i in ids.tolist():
        r = rows[i]
        cols["id"].append(i)
        cols["image_path"].append(r["path"])  # display text (non-UTF-8 bytes backslash-escaped)
        for c in META_COLUMNS:
            cols[c].append(r[c])
    table = pa.table({
        "id": pa.array(cols["id"], pa.int64()),
        "image_path": pa.array(cols["image_path"], pa.string()),
        # Fixed-size lists: no int32 offsets to overflow on large corpora (clip-retrieval reads lists).
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), vec.dim),
        "size": pa.array(cols["size"], pa.int64()), "mtime_ns": pa.array(cols["mtime_ns"], pa.int64()),
        "sha256": pa.array(cols["sha256"], pa.string()), "width": pa.array(cols["width"], pa.int32()),
        "height": pa.array(cols["height"], pa.int32()),
        "encoder": pa.array([encoder_name] * len(ids), pa.string()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(output, sink.getvalue().to_pybytes())
    return len(ids)

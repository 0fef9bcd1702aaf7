"""Straightforward evaluation used while training the default model.

* zero-shot top-1 on CIFAR-10-test and Imagenette-val (class folders; prompt ensemble of
  ``EVAL_TEMPLATES``, text embeddings averaged per class), and
* Flickr8k-1k text->image (and image->text) Recall@K.

Two paths share the metric code: ``evaluate_loaded`` runs a ``LoadedModel`` on the original
files (the reference fp32 numbers), ``evaluate_pack`` runs the training parts on the compact eval
copy carried to the GPU machine (quick check right after training).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clipfp8.quant.core.errors import DatasetError

log = logging.getLogger(__name__)

#: CLIP's CIFAR-10 prompt family (as in CLIP_benchmark), used for both zero-shot sets.
EVAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def class_folder(root: Path, limit_per_class: int | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files sorted, int64 labels (N,), class names) of a ``<class>/*.jpg`` folder.

    ``classes.json`` (wnid -> name), when present, names the classes; else the folder names do.
    """
    if not root.is_dir():
        raise DatasetError(f"evaluation folder not found: {root}")
    names_file = root / "classes.json"
    mapping = json.loads(names_file.read_text()) if names_file.is_file() else {}
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for i, d in enumerate(dirs):
        fs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)[:limit_per_class]
        files += fs
        labels += [i] * len(fs)
    if not files:
        raise DatasetError(f"no images under {root}")
    return files, np.array(labels, np.int64), [mapping.get(d.name, d.name) for d in dirs]


def flickr_folder(root: Path, limit: int | None = None) -> tuple[list[Path], list[str], np.ndarray]:
    """(image files, captions, int64 (n_captions,) image index of each caption)."""
    cap_file = root / "captions.json"
    if not cap_file.is_file():
        raise DatasetError(f"captions file not found: {cap_file}")
    caps = json.loads(cap_file.read_text())
    files, texts, owner = [], [], []
    for i, name in enumerate(sorted(caps)[:limit]):
        files.append(root / "images" / name)
        texts += caps[name]
        owner += [i] * len(caps[name])
    return files, texts, np.array(owner, np.int64)


def zero_shot_top1(img: torch.Tensor, class_txt: torch.Tensor, labels: np.ndarray) -> float:
    """img: float (N, D) unit rows; class_txt: float (K, T, D) prompt embeddings -> top-1 accuracy."""
    w = torch.nn.functional.normalize(class_txt.float(), dim=-1).mean(1)
    w = torch.nn.functional.normalize(w, dim=-1)
    pred = (img.float() @ w.T).argmax(1).cpu().numpy()
    return float((pred == labels).mean())


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, owner: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """img (N, D), txt (M, D) unit rows; owner[m] = image of caption m -> t2i/i2t Recall@K."""
    sim = (txt.float() @ img.float().T).cpu()
    own = torch.from_numpy(owner)
    rank_t2i = (sim > sim[torch.arange(len(own)), own][:, None]).sum(1)  # images scored above the true one
    out = {f"t2i_R@{k}": float((rank_t2i < k).float().mean()) for k in ks}
    order = sim.T.argsort(dim=1, descending=True)  # i2t: rank of each image's best true caption
    hit = own[order] == torch.arange(img.shape[0])[:, None]
    best = hit.float().argmax(1)
    out.update({f"i2t_R@{k}": float((best < k).float().mean()) for k in ks})
    return out


def _embed_files(encode: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable, files: Sequence[Path],
                 batch: int = 256) -> torch.Tensor:
    from PIL import Image

    out = []
    for i in range(0, len(files), batch):
        x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
        out.append(torch.nn.functional.normalize(encode(x).float(), dim=-1))
    return torch.cat(out)


@torch.inference_mode()
def evaluate_loaded(loaded: Any, eval_root: Path, limit_per_class: int | None = None,
                    flickr_limit: int | None = None, sets: Sequence[str] = ("cifar10-test", "imagenette-val", "flickr8k-1k")
                    ) -> dict[str, Any]:
    """fp32 metrics of a ``quant.core.models.LoadedModel`` on the original eval files (CPU)."""
    model, pre, tok = loaded.model.eval(), loaded.preprocess, loaded.tokenizer

    def enc_txt(texts: Sequence[str]) -> torch.Tensor:
        out = [model.encode_text(tok(list(texts[i:i + 256]))) for i in range(0, len(texts), 256)]
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    res: dict[str, Any] = {}
    for name in sets:
        root = Path(eval_root) / name
        if name == "flickr8k-1k":
            files, texts, owner = flickr_folder(root, flickr_limit)
            res[name] = retrieval_recall(_embed_files(model.encode_image, pre, files), enc_txt(texts), owner)
        else:
            files, labels, classes = class_folder(root, limit_per_class)
            txt = enc_txt([t.format(c) for c in classes for t in EVAL_TEMPLATES])
            txt = txt.reshape(len(classes), len(EVAL_TEMPLATES), -1)
            img = _embed_files(model.encode_image, pre, files)
            res[name] = {"top1": zero_shot_top1(img, txt, labels), "n": len(files)}
        log.info("%s: %s", name, res[name])
    return res


def build_eval_pack(eval_root: Path, out_dir: Path, model_cfg: dict[str, Any], size: int, quality: int,
                    n_cifar: int, n_imagenette: int, n_flickr: int, limit: int | None = None) -> dict[str, Any]:
    """Compact eval copy for the GPU machine: the first ``n_cifar``/10 CIFAR-10-test images of each
    class as 32x32 tiles, ``n_imagenette``/10 Imagenette-val images per class and the first
    ``n_flickr`` Flickr images as ``size`` squares (the eval transform's geometry), and the MiniLM
    features of every prompt and caption. Subsets: it must fit the 64 MiB transfer."""
    from PIL import Image

    from clipfp8.quant.train.data import decode_square, mosaic, save_jpeg, save_npz
    from clipfp8.quant.train.model import quantize_rows_int8, text_features

    cf, cl, cc = class_folder(eval_root / "cifar10-test", (n_cifar // 10) if limit is None else limit)
    nf, nl, nc = class_folder(eval_root / "imagenette-val", (n_imagenette // 10) if limit is None else limit)
    ff, ft, fo = flickr_folder(eval_root / "flickr8k-1k", n_flickr if limit is None else limit)
    c32 = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in cf])
    s64 = np.stack([decode_square(f.read_bytes(), size) for f in list(nf) + list(ff)])
    sizes = {"eval32.jpg": save_jpeg(mosaic(c32, 256), out_dir / "eval32.jpg", quality),
             "eval64.jpg": save_jpeg(mosaic(s64, 128), out_dir / "eval64.jpg", quality)}
    prompts = [t.format(c) for c in list(cc) + list(nc) for t in EVAL_TEMPLATES]
    q, s = quantize_rows_int8(text_features(prompts + list(ft), model_cfg))
    save_npz(out_dir / "eval.npz", cifar_labels=cl, imagenette_labels=nl, flickr_owner=fo,
              n=np.array([len(cf), len(nf), len(ff), len(cc), len(nc), len(EVAL_TEMPLATES)]),
              feats=q.numpy(), feat_scale=s.numpy())
    return {"n_cifar": len(cf), "n_imagenette": len(nf), "n_flickr": len(ff), "jpeg_bytes": sizes}


@torch.inference_mode()
def evaluate_pack(parts: Any, pack_dir: Path, to_input: Callable[[torch.Tensor], torch.Tensor],
                  device: str) -> dict[str, Any]:
    """Metrics of ``TrainableParts`` on the compact eval copy. ``to_input`` maps uint8 (N, 3, S, S)
    on ``device`` to the normalised float input at the model's resolution."""
    from PIL import Image

    from clipfp8.quant.train.data import unmosaic
    from clipfp8.quant.train.model import dequantize_rows_int8

    z = np.load(Path(pack_dir) / "eval.npz")
    n_c, n_n, n_f, k_c, k_n, t = (int(v) for v in z["n"])
    feats = dequantize_rows_int8(torch.from_numpy(z["feats"]), torch.from_numpy(z["feat_scale"])).to(device)
    txt = torch.nn.functional.normalize(parts.encode_text_features(feats).float(), dim=-1)

    def embed(u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))).to(device)
        out = [parts.encode_image(to_input(c)).float() for c in x.split(1024)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    c32 = unmosaic(np.asarray(Image.open(Path(pack_dir) / "eval32.jpg").convert("RGB")), n_c, 32)
    g64 = np.asarray(Image.open(Path(pack_dir) / "eval64.jpg").convert("RGB"))
    s64 = unmosaic(g64, n_n + n_f, g64.shape[1] // 128)
    ic, i64 = embed(c32), embed(s64)
    d = txt.shape[1]
    res = {"cifar10-test": {"top1": zero_shot_top1(ic, txt[:k_c * t].reshape(k_c, t, d), z["cifar_labels"]), "n": n_c},
           "imagenette-val": {"top1": zero_shot_top1(i64[:n_n], txt[k_c * t:(k_c + k_n) * t].reshape(k_n, t, d),
                                                     z["imagenette_labels"]), "n": n_n},
           "flickr8k-1k": retrieval_recall(i64[n_n:], txt[(k_c + k_n) * t:], z["flickr_owner"])}
    return res

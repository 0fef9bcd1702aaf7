"""Contrastive training of the default model's image tower + text projection on one GPU.

Everything lives in GPU memory: the uint8 images of the pack, the caption features, and the
augmentation (per-sample random resized crop + flip + colour jitter as one batched
``grid_sample``), so data loading never starves the step. The loss is a multi-positive
InfoNCE: every image/caption pair of the same *group* (class name or clip-art title) is a
positive, with soft targets spread evenly over the positives, in both directions.

The run length is set by a wall-clock budget: after a short probe the step count is fixed and the
cosine schedule is laid over it (same seed + same device -> same run).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipfp8.quant.core.fileio import atomic_path, atomic_write_text
from clipfp8.quant.train.model import TrainableParts, export_state

log = logging.getLogger(__name__)

#: OpenAI CLIP normalisation, the open_clip default the shipped preprocess uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (defaults = the shipped model's run)."""

    pack_dir: Path = Path(".carry/pack")
    out_dir: Path = Path("artifacts/train")
    device: str = "cuda"
    seed: int = 0
    batch_size: int = 2048
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 300
    max_steps: int = 20000
    time_budget_s: float = 360.0  # seconds for load + compile + training; sets the step count
    probe_steps: int = 30
    grad_clip: float = 1.0
    compile: bool = True
    bf16: bool = True
    # fraction of each batch drawn from each source (class balance across sources)
    source_weights: tuple[float, ...] = (0.45, 0.25, 0.2, 0.1)
    scale32: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area range, 32x32 CIFAR
    scale64: tuple[float, float] = (0.25, 1.0)  # ... and the 64x64 sources
    jitter: float = 0.2
    erase_p: float = 0.25  # random erasing: a regulariser ViTs need on small data
    log_every: int = 25

    def __post_init__(self) -> None:
        object.__setattr__(self, "pack_dir", Path(self.pack_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("batch_size", "max_steps", "probe_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.time_budget_s <= 0:
            raise ValueError("TrainConfig.lr and TrainConfig.time_budget_s must be > 0")
        if any(w < 0 for w in self.source_weights) or sum(self.source_weights) <= 0:
            raise ValueError(f"TrainConfig.source_weights must be >= 0 with a positive sum: {self.source_weights}")


def to_input(u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, s, s) -> float (N, 3, size, size) normalised; bicubic when s != size (CIFAR)."""
    x = u8.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 255)
    return _normalise(x)


def _normalise(x255: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x255.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x255.device).view(1, 3, 1, 1) * 255
    return (x255 - mean) / std


def augment(u8: torch.Tensor, size: int, scale: tuple[float, float], jitter: float,
            gen: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3), erase_p: float = 0.0) -> torch.Tensor:
    """Random resized crop (area ``scale``, aspect ``ratio``) + horizontal flip + brightness/
    contrast/saturation jitter (+ random erasing with probability ``erase_p``), per sample, batched.
    uint8 (N, 3, s, s) -> float (N, 3, size, size), normalised."""
    n, dev = u8.shape[0], u8.device

    def rand(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=gen) * (hi - lo) + lo

    area = rand(*scale)
    aspect = torch.exp(rand(math.log(ratio[0]), math.log(ratio[1])))
    w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    cx, cy = rand(-1, 1) * (1 - w), rand(-1, 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=dev, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(u8.float(), grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        b, c, s = (rand(1 - jitter, 1 + jitter).view(n, 1, 1, 1) for _ in range(3))
        x = x * b
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * c + x.mean(dim=(1, 2, 3), keepdim=True)
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = (x - gray) * s + gray
    x = _normalise(x.clamp(0, 255))
    return random_erase(x, erase_p, gen) if erase_p > 0 else x


def random_erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero (the dataset mean, after normalisation) one random box of 2-25% of the area in a
    fraction ``p`` of the samples. float (N, 3, S, S) -> same."""
    n, _, hgt, wid = x.shape
    dev = x.device
    r = torch.rand(n, 5, device=dev, generator=gen)
    area = 0.02 + 0.23 * r[:, 0]
    aspect = torch.exp((r[:, 1] - 0.5) * 2 * math.log(3.0))
    bh = (area * aspect).sqrt().clamp(max=1.0) * hgt
    bw = (area / aspect).sqrt().clamp(max=1.0) * wid
    y0, x0 = r[:, 2] * (hgt - bh), r[:, 3] * (wid - bw)
    ys = torch.arange(hgt, device=dev).view(1, hgt, 1)
    xs = torch.arange(wid, device=dev).view(1, 1, wid)
    box = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + bh).view(n, 1, 1))
           & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + bw).view(n, 1, 1)) & (r[:, 4] < p).view(n, 1, 1))
    return x.masked_fill(box[:, None], 0.0)


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE with duplicate captions: img/txt float (B, D) unit rows, groups int (B,).

    Every (image, caption) of the same group is a positive; targets are spread uniformly over the
    positives (soft labels), image->text and text->image, averaged."""
    logits = logit_scale.exp().clamp(max=100) * img.float() @ txt.float().T
    pos = (groups[:, None] == groups[None, :]).float()
    li = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(pos / pos.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (li + lt) / 2


class GpuBatcher:
    """Draws class-balanced-by-source batches from the pack held in device memory."""

    def __init__(self, pack: dict[str, Any], feats: torch.Tensor, cfg: TrainConfig, size: int) -> None:
        dev = cfg.device
        self.cfg, self.size = cfg, size
        self.img32 = torch.from_numpy(pack["img32"]).to(dev)
        self.img64 = torch.from_numpy(pack["img64"]).to(dev)
        self.g32 = torch.from_numpy(pack["group32"]).long().to(dev)
        self.g64 = torch.from_numpy(pack["group64"]).long().to(dev)
        self.gcap = torch.from_numpy(pack["group_captions"]).long().to(dev)
        self.feats = feats.to(dev)
        s32, s64 = torch.from_numpy(pack["source32"]).long(), torch.from_numpy(pack["source64"]).long()
        self.pools = []  # (is32, indices) for each source present
        w = []
        for si, wt in enumerate(cfg.source_weights[:len(pack["meta"]["sources"])]):
            for is32, src in ((True, s32), (False, s64)):
                idx = (src == si).nonzero().flatten()
                if len(idx) and wt > 0:
                    self.pools.append((is32, idx.to(dev)))
                    w.append(wt)
        if not self.pools:
            raise ValueError("the training pack holds no sample of a source with a positive weight")
        w_arr = np.array(w) / sum(w)
        counts = np.floor(w_arr * cfg.batch_size).astype(int)
        counts[0] += cfg.batch_size - counts.sum()
        self.counts = counts.tolist()
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(cfg.seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> images float (B, 3, S, S) normalised, caption features (B, 384), groups int64 (B,)."""
        xs, gs = [], []
        for (is32, idx), n in zip(self.pools, self.counts, strict=True):
            pick = idx[torch.randint(len(idx), (n,), device=idx.device, generator=self.gen)]
            src, grp = (self.img32, self.g32) if is32 else (self.img64, self.g64)
            sc = self.cfg.scale32 if is32 else self.cfg.scale64
            xs.append(augment(src[pick], self.size, sc, self.cfg.jitter, self.gen, erase_p=self.cfg.erase_p))
            gs.append(grp[pick])
        groups = torch.cat(gs)
        col = torch.randint(self.gcap.shape[1], (len(groups),), device=groups.device, generator=self.gen)
        return torch.cat(xs), self.feats[self.gcap[groups, col]], groups


def _optimizer(parts: TrainableParts, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in parts.named_parameters():
        # no decay for gains/biases, embeddings and the temperature (standard CLIP/ViT practice)
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` then cosine to 0 over ``total`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _step_fn(parts: TrainableParts, visual: Callable, opt: torch.optim.Optimizer,
             cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]:
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32

    def step(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=cfg.bf16):
            img = F.normalize(visual(x).float(), dim=-1)
            txt = F.normalize(parts.encode_text_features(f).float(), dim=-1)
        loss = multi_positive_loss(img, txt, g, parts.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            parts.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    return step


def _warm_compiled(parts: TrainableParts, cfg: TrainConfig, batcher: GpuBatcher,
                   opt: torch.optim.Optimizer) -> Callable:
    """torch.compile the image tower when asked and it works here; else eager. Two warm-up steps
    at lr 0 trigger compilation (Adam moments are reset afterwards)."""
    visual: Callable = parts.visual
    if cfg.compile:
        try:
            visual = torch.compile(parts.visual)
            step = _step_fn(parts, visual, opt, cfg)
            for _ in range(2):
                step(*batcher.next(), 0.0)
            torch.cuda.synchronize() if cfg.device.startswith("cuda") else None
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
            visual = parts.visual
        opt.state.clear()
    return visual


def train(cfg: TrainConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train from the pack in ``cfg.pack_dir``; writes ``model.safetensors`` (fp16), ``train_log.csv``,
    ``summary.json`` and ``loss.png`` into ``cfg.out_dir``; returns the summary."""
    from clipfp8.quant.train.prep import feats_tensor, load_pack

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    pack = load_pack(cfg.pack_dir)
    model_cfg = pack["meta"]["model_cfg"]
    size = int(model_cfg["vision_cfg"]["image_size"])
    parts = TrainableParts(model_cfg).to(cfg.device)
    batcher = GpuBatcher(pack, feats_tensor(pack), cfg, size)
    opt = _optimizer(parts, cfg)
    t_load = time.perf_counter() - t_start
    visual = _warm_compiled(parts, cfg, batcher, opt)
    step_fn = _step_fn(parts, visual, opt, cfg)
    t_train0 = time.perf_counter()
    rows, total, step, loss_acc = [], cfg.max_steps, 0, []
    while step < total:
        loss = step_fn(*batcher.next(), lr_at(step, total, cfg))
        loss_acc.append(loss)
        step += 1
        if step == cfg.probe_steps:
            torch.cuda.synchronize() if cfg.device.startswith("cuda") else None
            per_step = (time.perf_counter() - t_train0) / step
            left = cfg.time_budget_s - (time.perf_counter() - t_start)  # the budget covers load + compile
            # Never past max_steps; at least the probe itself (the loop ends at once if no time is left).
            total = min(cfg.max_steps, max(step, step + int(left / per_step)))
            log.info("probe: %.1f ms/step -> %d steps in the %.0f s budget", per_step * 1e3, total, cfg.time_budget_s)
        if step % cfg.log_every == 0 or step == total:
            mean_loss = float(torch.stack(loss_acc).mean())
            loss_acc = []
            el = time.perf_counter() - t_train0
            row = {"step": step, "loss": round(mean_loss, 5), "lr": lr_at(step - 1, total, cfg),
                   "logit_scale": round(float(parts.logit_scale.detach().exp()), 3), "elapsed_s": round(el, 2),
                   "img_per_s": round(step * cfg.batch_size / el, 1)}
            rows.append(row)
            if progress:
                progress(dict(row, total=total))
    train_s = time.perf_counter() - t_train0
    return _finish(parts, cfg, model_cfg, pack["meta"], rows,
                   {"load_s": round(t_load, 1), "compile_warmup_s": round(t_train0 - t_start - t_load, 1),
                    "train_s": round(train_s, 1), "steps": total,
                    "samples_seen": total * cfg.batch_size})


def _finish(parts: TrainableParts, cfg: TrainConfig, model_cfg: dict[str, Any], meta: dict[str, Any],
            rows: list[dict[str, Any]], timing: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from clipfp8.quant.train.evaluate import evaluate_pack

    parts.eval()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # weights and log first: a failing quick eval must not lose the run
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(export_state(parts), str(tmp))
    log_csv = io.StringIO()
    w = csv.DictWriter(log_csv, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "train_log.csv", log_csv.getvalue())
    t0 = time.perf_counter()
    metrics: dict[str, Any] | None = None
    if (cfg.pack_dir / "eval.npz").is_file():
        size = int(model_cfg["vision_cfg"]["image_size"])
        try:
            metrics = evaluate_pack(parts, cfg.pack_dir, lambda u8: to_input(u8, size), cfg.device)
        except Exception as e:  # noqa: BLE001 - the quick check is optional; the CPU eval is the reference
            log.warning("quick eval failed: %s: %s", type(e).__name__, e)
    timing["eval_s"] = round(time.perf_counter() - t0, 1)
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "model_cfg": model_cfg,
               "pack": {k: meta[k] for k in ("n32", "n64", "per_source", "n_groups", "n_captions")},
               "timing": timing, "final_loss": rows[-1]["loss"], "eval_gpu_pack": metrics,
               "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))  # train-ship reads it
    plot_loss(rows, out / "loss.png")
    return summary


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss (and temperature) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="multi-positive InfoNCE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["logit_scale"] for r in rows], color="tab:orange", label="logit scale")
    ax2.set_ylabel("logit scale")
    fig.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

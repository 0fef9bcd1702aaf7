"""Contrastive training of the default model's image tower + text projection on one GPU.

Everything lives in GPU memory: the uint8 images of the pack, the caption features, and the
augmentation (per-sample random resized crop + flip + colour jitter as one batched
``grid_sample``), so data loading never starves the step. Each batch draws fixed shares from the
sources (class sets, clip art, captioned photos) and one caption per sample, uniformly among its
group's captions (a Flickr8k photo: one of its five). The loss is a multi-positive InfoNCE: every
image/caption pair of the same *group* (class name, clip-art title, or one photo) is a positive,
with soft targets spread evenly over the positives, in both directions; two different photos are
never positives of each other.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipfp8.quant.core.fileio import atomic_path, atomic_write_text
from clipfp8.quant.train.data import PHOTO_SOURCES, SOURCES
from clipfp8.quant.train.model import TrainableParts, export_state, project_text_weights

log = logging.getLogger(__name__)

#: Fraction of each batch drawn from each source: about half captioned photos (Flickr8k is the
#: in-domain one: 7,090 photos drawn as often as 18,605 webcaps), the rest class sets and clip art
#: (within a source, samples are drawn uniformly).
DEFAULT_SOURCE_WEIGHTS: dict[str, float] = {"cifar10-train": 0.24, "imagenette-train": 0.14, "openclipart": 0.08,
                                            "imagen": 0.04, "flickr8k-train": 0.25, "webcaps": 0.25}
#: ``vision_cfg`` keys ``TrainConfig.vision`` may override (the pack's model config holds the rest).
VISION_KEYS: tuple[str, ...] = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")

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
    time_budget_s: float = 510.0  # seconds for load + compile + training; sets the step count (8.5 min: one device call)
    probe_steps: int = 30
    grad_clip: float = 1.0
    compile: bool = True
    bf16: bool = True
    # fraction of each batch drawn from each source (by name; a source the pack lacks is ignored)
    source_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
    scale32: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area range, 32x32 CIFAR
    scale64: tuple[float, float] = (0.25, 1.0)  # ... the class and clip-art sources
    scale_photo: tuple[float, float] = (0.5, 1.0)  # ... captioned photos (captions describe the whole scene)
    vision: dict[str, Any] | None = None  # overrides of the pack's vision_cfg (VISION_KEYS), e.g. {"layers": 10}
    jitter: float = 0.2
    erase_p: float = 0.25  # random erasing: a regulariser ViTs need on small data
    log_every: int = 25

    def __post_init__(self) -> None:
        object.__setattr__(self, "pack_dir", Path(self.pack_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("batch_size", "max_steps", "probe_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0 or self.time_budget_s <= 0:
            raise ValueError("TrainConfig.lr and TrainConfig.time_budget_s must be > 0")
        unknown = set(self.source_weights) - set(SOURCES)
        if unknown:
            raise ValueError(f"TrainConfig.source_weights: unknown sources {sorted(unknown)}; known {SOURCES}")
        if any(w < 0 for w in self.source_weights.values()) or sum(self.source_weights.values()) <= 0:
            raise ValueError(f"TrainConfig.source_weights must be >= 0 with a positive sum: {self.source_weights}")
        bad = set(self.vision or {}) - set(VISION_KEYS)
        if bad:
            raise ValueError(f"TrainConfig.vision: unknown keys {sorted(bad)}; allowed {VISION_KEYS}")

    def model_cfg(self, pack_model_cfg: dict[str, Any]) -> dict[str, Any]:
        """The pack's open_clip config with ``vision`` applied (the config that is trained and shipped)."""
        cfg = json.loads(json.dumps(pack_model_cfg))
        cfg["vision_cfg"].update(self.vision or {})
        return cfg


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
    positives (soft labels), image->text and text->image, averaged. A photo is a group of its
    own, so its only positives are its own captions (and itself, if drawn twice); with all groups
    distinct this is the plain CLIP loss."""
    logits = logit_scale.exp().clamp(max=100) * img.float() @ txt.float().T
    pos = (groups[:, None] == groups[None, :]).float()
    li = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(pos / pos.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (li + lt) / 2


def padded_captions(offsets: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR caption lists (``offsets`` int (G+1,), ``ids`` int) -> (int64 (G, T) caption ids, each
    row padded with its first id; int64 (G,) caption counts), for drawing on the device."""
    counts = np.diff(offsets)
    if len(counts) and counts.min() < 1:
        raise ValueError(f"group {int(np.argmin(counts))} of the pack owns no caption")
    t = int(counts.max()) if len(counts) else 1
    pad = np.repeat(ids[offsets[:-1]][:, None], t, axis=1) if len(counts) else np.zeros((0, 1), np.int64)
    col = np.arange(t)[None, :]
    take = np.minimum(offsets[:-1, None] + col, len(ids) - 1)
    pad = np.where(col < counts[:, None], ids[take], pad)
    return torch.from_numpy(pad.astype(np.int64)), torch.from_numpy(counts.astype(np.int64))


class GpuBatcher:
    """Draws batches with fixed per-source shares from the pack held in device memory."""

    def __init__(self, pack: dict[str, Any], feats: torch.Tensor, cfg: TrainConfig, size: int) -> None:
        dev = cfg.device
        self.cfg, self.size = cfg, size
        self.img32 = torch.from_numpy(pack["img32"]).to(dev)
        self.img64 = torch.from_numpy(pack["img64"]).to(dev)
        self.g32 = torch.from_numpy(pack["group32"]).long().to(dev)
        self.g64 = torch.from_numpy(pack["group64"]).long().to(dev)
        cap_pad, cap_n = padded_captions(pack["cap_offsets"], pack["cap_ids"])
        self.cap_pad, self.cap_n = cap_pad.to(dev), cap_n.to(dev)
        self.feats = feats.to(dev)
        self.pools, self.counts = self._pools(pack, cfg)
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(cfg.seed)

    @staticmethod
    def _pools(pack: dict[str, Any], cfg: TrainConfig) -> tuple[list[tuple[str, bool, torch.Tensor]], list[int]]:
        """([(source, is32, sample indices)], samples per batch) for each source drawn from."""
        s32, s64 = torch.from_numpy(pack["source32"]).long(), torch.from_numpy(pack["source64"]).long()
        pools, w = [], []
        for si, source in enumerate(pack["meta"]["sources"]):
            wt = cfg.source_weights.get(source, 0.0)
            for is32, src in ((True, s32), (False, s64)):
                idx = (src == si).nonzero().flatten()
                if len(idx) and wt > 0:
                    pools.append((source, is32, idx.to(cfg.device)))
                    w.append(wt)
        if not pools:
            raise ValueError(f"the training pack holds no sample of a source with a positive weight "
                             f"(pack: {pack['meta']['sources']}, weights: {cfg.source_weights})")
        w_arr = np.array(w) / sum(w)
        counts = np.floor(w_arr * cfg.batch_size).astype(int)
        counts[int(np.argmax(w_arr))] += cfg.batch_size - counts.sum()
        log.info("batch of %d: %s", cfg.batch_size, {p[0]: int(c) for p, c in zip(pools, counts, strict=True)})
        return pools, counts.tolist()

    def _scale(self, source: str, is32: bool) -> tuple[float, float]:
        return self.cfg.scale32 if is32 else self.cfg.scale_photo if source in PHOTO_SOURCES else self.cfg.scale64

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> images float (B, 3, S, S) normalised, caption features (B, 384), groups int64 (B,).
        Each sample's caption is drawn uniformly among its group's captions."""
        xs, gs = [], []
        for (source, is32, idx), n in zip(self.pools, self.counts, strict=True):
            if n == 0:
                continue
            pick = idx[torch.randint(len(idx), (n,), device=idx.device, generator=self.gen)]
            src, grp = (self.img32, self.g32) if is32 else (self.img64, self.g64)
            xs.append(augment(src[pick], self.size, self._scale(source, is32), self.cfg.jitter, self.gen,
                              erase_p=self.cfg.erase_p))
            gs.append(grp[pick])
        groups = torch.cat(gs)
        u = torch.rand(len(groups), device=groups.device, generator=self.gen)
        col = (u * self.cap_n[groups]).long().clamp_max(self.cap_pad.shape[1] - 1)
        return torch.cat(xs), self.feats[self.cap_pad[groups, col]], groups


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
    model_cfg = cfg.model_cfg(pack["meta"]["model_cfg"])
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
    # only the span of the carried PCA basis was trained: ship exactly the trained function
    project_text_weights(parts, torch.from_numpy(pack["text_basis"]))
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
               "pack": {k: meta[k] for k in ("n32", "n64", "per_source", "n_groups", "n_captions", "size",
                                             "image_format", "text_dims", "text_energy_kept") if k in meta},
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

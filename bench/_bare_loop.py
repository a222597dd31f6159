"""The bare PyTorch baseline of ``bench/realdata.py``: a small U-Net trained the plain way, in one process.

It stands for "the 200-line script a lab would write" (issue 14), so it must stay independent of
hierseg: nothing here imports hierseg's model, loss, loader or normalisation. It reads whole training
images already in memory, draws a fresh random crop (random rot90 and flips) for every sample,
z-scores each image over its whole slice, and trains with plain cross-entropy, AdamW and a cosine
schedule. The U-Net has the same blocks, width and depth as hierseg's (batch norm), so the two sides
differ in the training recipe and the machinery around it, not in the architecture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # torch's cross-entropy default ignore_index


@dataclass(frozen=True)
class BareConfig:
    steps: int
    batch: int
    patch: int
    base_channels: int
    depth: int
    lr: float = 2e-3
    threads: int = 2
    log_every: int = 10  # steps in the warm-up window left out of patches/s, as on hierseg's side


class _Block(nn.Sequential):
    """Two 3x3 conv + batch norm + SiLU, as hierseg's ConvBlock (so only the recipe differs)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU(inplace=True),
        )


class UNet(nn.Module):
    """Plain U-Net: max-pool down, transposed-conv up, concatenated skips, one softmax head."""

    def __init__(self, num_classes: int, base_channels: int, depth: int):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = _Block(1, widths[0])
        self.down = nn.ModuleList(_Block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(_Block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        feat = skips.pop()
        for up, merge in zip(self.up, self.merge):
            feat = merge(torch.cat([up(feat), skips.pop()], 1))
        return self.head(feat)


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-image z-score over the whole slice (crops are cut after, so a crop keeps its slice's scale)."""
    x = image.astype(np.float32)
    return (x - x.mean()) / max(float(x.std()), 1e-6)


def sample_batch(
    rng: np.random.Generator, images: list[np.ndarray], targets: list[np.ndarray], batch: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` fresh crops: a random image, a uniform position, a random rot90 and flips per sample."""
    xs, ys = [], []
    for _ in range(batch):
        i = int(rng.integers(len(images)))
        h, w = images[i].shape
        y0, x0 = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
        x = images[i][y0 : y0 + patch, x0 : x0 + patch]
        y = targets[i][y0 : y0 + patch, x0 : x0 + patch]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


def train(
    images: list[np.ndarray], targets: list[np.ndarray], num_classes: int, cfg: BareConfig, seed: int
) -> tuple[UNet, dict[str, float]]:
    """Train from scratch; ``targets`` hold class indices or ``IGNORE``. Returns the model and timings."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = [zscore(im) for im in images]
    model = UNet(num_classes, cfg.base_channels, cfg.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    model.train()
    skip = cfg.log_every if cfg.steps > cfg.log_every else 0
    steady_s, t_start = 0.0, time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = sample_batch(rng, inputs, targets, cfg.batch, cfg.patch)
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= skip:  # the first window holds allocator and kernel warm-up, left out as for hierseg
            steady_s += time.perf_counter() - t0
    stats = {
        "patches_per_s": (cfg.steps - skip) * cfg.batch / max(steady_s, 1e-9),
        "train_s": time.perf_counter() - t_start,
        "final_loss": loss.item(),
    }
    return model, stats


@torch.no_grad()
def predict(model: UNet, image: np.ndarray, depth: int) -> np.ndarray:
    """Class index per pixel of a whole image: one forward pass, padded (reflect) to a multiple of 2**depth."""
    model.eval()
    h, w = image.shape
    m = 2**depth
    x = torch.from_numpy(zscore(image))[None, None]
    x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
    return model(x)[0, :, :h, :w].argmax(0).numpy()

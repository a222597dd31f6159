"""AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math

import torch

from hierseg.spec import OptimSpec


def build_optimizer(spec: OptimSpec, model: torch.nn.Module) -> torch.optim.AdamW:
    # No weight decay on norms and biases: decaying them only fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def lr_factor(step: int, spec: OptimSpec, max_steps: int) -> float:
    """Multiplier of ``lr`` after ``step`` optimizer steps."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, max_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    spec: OptimSpec, optimizer: torch.optim.Optimizer, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec, max_steps))

"""Linear warm-up then cosine decay to ``min_lr`` (nanoGPT's schedule, step counted from 0)."""

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step > decay_steps:
        return min_lr
    span = max(1, decay_steps - warmup_steps)
    ratio = (step - warmup_steps) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def lr_schedule(cfg):
    """step -> learning rate for a resolved config."""
    t = cfg.train
    decay = t.lr_decay_steps or t.max_steps
    return lambda step: lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                              decay_steps=decay)

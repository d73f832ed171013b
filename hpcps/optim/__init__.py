"""Optimizer pieces that run on any contiguous slice of the flat parameter buffer."""

import numpy as np

from hpcps.optim.adamw import AdamW  # noqa: F401
from hpcps.optim.clip import clip_coefficient, sum_of_squares  # noqa: F401
from hpcps.optim.schedule import lr_at  # noqa: F401
from hpcps.optim.sgd import SGD  # noqa: F401


def make_optimizer(cfg, n: int, decay_ranges, xp=None):
    """The optimizer named by ``cfg.train.optimizer`` for a slice of ``n`` elements."""
    xp = np if xp is None else xp
    if cfg.train.optimizer == "sgd":
        return SGD(n, decay_ranges, momentum=cfg.train.momentum,
                   weight_decay=cfg.train.weight_decay, xp=xp)
    return AdamW(n, decay_ranges, beta1=cfg.train.beta1, beta2=cfg.train.beta2,
                 eps=cfg.train.eps, weight_decay=cfg.train.weight_decay, xp=xp)

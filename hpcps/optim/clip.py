"""Global-norm clipping split in two halves so shards can combine their parts:
each shard computes ``sum_of_squares`` of its slice, the sums are added (an
allreduce between servers), and every shard scales by the same coefficient."""

import math


def sum_of_squares(grad) -> float:
    g = grad.reshape(-1)
    return float(g @ g)


def clip_coefficient(total_sumsq: float, max_norm: float) -> tuple[float, float]:
    """(global norm, scale to apply) with torch.nn.utils.clip_grad_norm_ semantics."""
    norm = math.sqrt(max(total_sumsq, 0.0))
    if max_norm <= 0:
        return norm, 1.0
    coef = max_norm / (norm + 1e-6)
    return norm, min(coef, 1.0)

"""Corpus chrF (character n-gram F-score), equal to sacrebleu's default ``corpus_chrf``.

sacrebleu's defaults: character n-grams of orders 1..6 with whitespace removed, no
word n-grams, beta = 2 (recall weighs 4 times precision), case kept. Per segment the
statistics are, for each order, (hypothesis n-grams, reference n-grams, matches),
with the best-scoring reference when there are several; the corpus score comes from
the summed statistics: precision and recall averaged over the orders that both sides
have, then F-beta. The statistics are additive, so workers' sums combine exactly.
Chinese needs no tokenizer here: every character is an n-gram unit anyway.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from hpcps.metrics.text import RefsArg, _refs_per_item

CHAR_ORDER = 6
BETA = 2


def char_ngrams(text: str, order: int = CHAR_ORDER) -> list[Counter]:
    """Counters of the character n-grams of orders 1..order, whitespace removed."""
    chars = "".join(text.split())
    return [Counter(chars[i:i + n] for i in range(len(chars) - n + 1))
            for n in range(1, order + 1)]


def _segment_stats(hyp: list[Counter], ref: list[Counter]) -> list[int]:
    stats = []
    for h, r in zip(hyp, ref):
        matches = sum(min(count, r[gram]) for gram, count in h.items() if gram in r)
        ref_total = sum(r.values())
        # an order the reference lacks counts no hypothesis n-grams (as sacrebleu)
        stats += [sum(h.values()) if ref_total else 0, ref_total, matches]
    return stats


def f_score(stats: Sequence[int], order: int = CHAR_ORDER, beta: float = BETA) -> float:
    """chrF (0-100) of flattened [hyp, ref, match] x order statistics."""
    factor = beta ** 2
    precision = recall = 0.0
    effective = 0
    for n in range(order):
        n_hyp, n_ref, n_match = stats[3 * n:3 * n + 3]
        if n_hyp > 0 and n_ref > 0:        # orders one side lacks stay out of the average
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision /= effective
    recall /= effective
    if precision + recall == 0:
        return 0.0
    return 100.0 * (1 + factor) * precision * recall / (factor * precision + recall)


def chrf_stats(hyps: Sequence[str], refs: RefsArg, order: int = CHAR_ORDER,
               beta: float = BETA) -> list[int]:
    """Summed [hyp, ref, match] x order statistics of a corpus (additive over parts)."""
    per_item = _refs_per_item(hyps, refs)
    total = [0] * (3 * order)
    for hyp, group in zip(hyps, per_item):
        hyp_grams = char_ngrams(hyp, order)
        best, best_f = None, -1.0
        for ref in group:
            stats = _segment_stats(hyp_grams, char_ngrams(ref, order))
            score = f_score(stats, order, beta)
            if score > best_f:              # the first of equally good references
                best, best_f = stats, score
        total = [a + b for a, b in zip(total, best)]
    return total


def chrf(hyps: Sequence[str], refs: RefsArg, order: int = CHAR_ORDER,
         beta: float = BETA) -> float:
    """Corpus chrF on a 0-100 scale; ``refs[i]`` is the reference (or list of them) of
    ``hyps[i]``."""
    return f_score(chrf_stats(hyps, refs, order, beta), order, beta)

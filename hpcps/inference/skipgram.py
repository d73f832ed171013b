"""A trained skip-gram model (workload ``skipgram``) scored on a corpus split.

The vectors themselves are exported by ``hpcps embed``; evaluation draws
(center, context, negatives) pairs from the split exactly as training's
evaluation does (the run's window, negatives and subsampling, drawn from a hash of
the seed and the pair index) and reports the loss and the pair accuracy: the share
of pairs whose true context outscores all k negatives (chance 1 / (k + 1)).
"""

from __future__ import annotations

from typing import Callable, Optional

from hpcps.backend import CPU
from hpcps.inference.checkpoint import (
    check_corpus_tokenizer,
    described,
    load_params,
    open_for,
    open_lm_corpus,
)
from hpcps.workloads.skipgram import SkipGramWorkload

EVAL_CHUNK = 4096


def load_skipgram_eval(path: str, data_path: str, backend=None, purpose: str = "hpcps eval"):
    """(workload on corpus ``data_path``, params, checkpoint): the workload supplies the
    pair sampler; the model's shape comes from the checkpoint."""
    ck, describe = open_for(path, ("skipgram",), purpose)
    cfg = ck.config.replace(data__path=data_path)
    corpus = open_lm_corpus(data_path, "skip-gram")
    check_corpus_tokenizer(corpus.tokenizer, describe.get("tokenizer_sha256", ""), data_path,
                           ck.path)
    workload = SkipGramWorkload(cfg, backend or CPU, corpus)
    described(ck, describe, "vocab_size")
    return workload, load_params(ck, workload.model), ck


def evaluate(workload, params, split: str, max_items: Optional[int],
             on_progress: Optional[Callable[[int], None]] = None) -> dict:
    """Loss and pair accuracy over as many pairs as the split keeps tokens after
    subsampling (each position a center once on average), or ``max_items``."""
    sampler = workload.sampler(split)
    n = sampler.n if max_items is None else min(sampler.n, max_items)
    loss_sum = hits = 0.0
    for a in range(0, n, EVAL_CHUNK):
        b = min(n, a + EVAL_CHUNK)
        centers, targets = sampler.batch(0, a, b)
        loss, hit = workload.model.pair_stats(params, workload._device(centers),
                                              workload._device(targets))
        loss_sum += loss
        hits += hit
        if on_progress is not None:
            on_progress(b - a)
    return {"split": split, "pairs": n, "loss": loss_sum / max(n, 1),
            "pair_accuracy": hits / max(n, 1), "chance": 1.0 / (workload.negatives + 1)}

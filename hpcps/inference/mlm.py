"""A trained masked language model (workload ``bert``): load it, fill ``[MASK]`` slots
with the most probable tokens, and score it on a corpus split.

``[MASK]`` in the user's text becomes the model's extra id (the corpus vocabulary
size); every other piece is encoded with the checkpoint's tokenizer, so one
``[MASK]`` stands for exactly one token (one character for a char tokenizer). The
model never predicts [MASK] itself, so it is left out of the fillers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hpcps.backend import CPU
from hpcps.data.sampler import sequence_keys
from hpcps.errors import UserError
from hpcps.inference.checkpoint import (
    check_corpus_tokenizer,
    described,
    encode_piece,
    load_params,
    open_for,
    open_lm_corpus,
    saved_tokenizers,
)
from hpcps.model.bert import BertMLM
from hpcps.workloads.bert import VAL_MASK_STREAM, mask_tokens

MASK_TEXT = "[MASK]"


@dataclass
class MaskedLM:
    checkpoint: object      # hpcps.checkpoint.CheckpointReader
    model: object           # hpcps.model.bert.BertMLM
    params: object
    tokenizer: object
    mask_id: int

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def encode_masked(self, text: str, where: str) -> np.ndarray:
        """Ids of ``text`` with each [MASK] as the mask id; it must hold one at least and
        fit the model's block_size."""
        if not text.strip():
            raise UserError(f"{where} is empty: give some text to work on")
        pieces = text.split(MASK_TEXT)
        if len(pieces) == 1:
            raise UserError(f"{where} has no {MASK_TEXT} to fill")
        ids: list = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(self.mask_id)
            if piece:
                ids.extend(encode_piece(self.tokenizer, piece, where).tolist())
        if len(ids) > self.model.block_size:
            raise UserError(f"{where} is {len(ids)} tokens; the model reads at most "
                            f"{self.model.block_size} (its block_size)")
        return np.asarray(ids, dtype=np.int64)

    def fill(self, ids: np.ndarray, top_k: int) -> list:
        """Per [MASK] of ``ids`` (in order): its top_k (token text, probability)."""
        backend = self.model.backend
        targets = np.where(ids == self.mask_id, 0, -1)[None]
        logits = backend.asnumpy(self.model.logits(self.params, backend.asarray(ids[None]),
                                                   backend.asarray(targets)))
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        probs[:, self.mask_id] = -1.0                  # never offered as a filler
        k = min(top_k, self.mask_id)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.tokenizer.decode([int(j)]), float(row[j])) for j in top]
                for row, top in zip(probs, order)]


def load_masked_lm(path: str, backend=None, purpose: str = "hpcps fill-mask") -> MaskedLM:
    ck, describe = open_for(path, ("bert",), purpose)
    tokenizer = saved_tokenizers(ck, ("text",), describe)["text"]
    vocab = int(described(ck, describe, "vocab_size"))
    mask_id = int(describe.get("mask_id", vocab - 1))
    if tokenizer.vocab_size != mask_id:
        raise UserError(f"checkpoint {ck.path}: its tokenizer has {tokenizer.vocab_size} tokens "
                        f"but the model's [MASK] id is {mask_id}")
    m = ck.config.model
    model = BertMLM(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                    block_size=m.block_size, bias=m.bias, backend=backend or CPU)
    return MaskedLM(ck, model, load_params(ck, model), tokenizer, mask_id)


# -- evaluation ---------------------------------------------------------------------------
def open_lm(loaded: MaskedLM, data_path: str):
    corpus = open_lm_corpus(data_path, "BERT")
    describe = loaded.checkpoint.manifest.get("describe", {})
    check_corpus_tokenizer(corpus.tokenizer, describe.get("tokenizer_sha256", ""), data_path,
                           loaded.checkpoint.path)
    return corpus


def evaluate(loaded: MaskedLM, corpus, split: str, max_tokens: Optional[int],
             batch_size: int = 16, on_progress: Optional[Callable[[int], None]] = None) -> dict:
    """Masked-token loss, perplexity and accuracy over non-overlapping block_size windows
    of ``split`` (the first ``max_tokens`` tokens), masked as in training's evaluation
    (a hash of the run's seed and the window index), with the unigram baseline: always
    the most frequent token of the corpus's train split."""
    cfg = loaded.checkpoint.config
    bc, block = cfg.bert, loaded.model.block_size
    part = corpus.split(split)
    n_tokens = part.n_tokens if max_tokens is None else min(part.n_tokens, max_tokens)
    full, rest = divmod(n_tokens, block)
    # (first window, end window, length): batches of full windows, then the remainder
    # (a lone trailing token has no context to predict it from: left out)
    batches = [(w, min(full, w + batch_size), block) for w in range(0, full, batch_size)]
    if rest >= 2 or (full == 0 and rest):
        batches.append((full, full + 1, rest))
    keys = sequence_keys(cfg.train.seed, VAL_MASK_STREAM, 0, 0, full + 1)
    unigram = most_frequent_token(corpus)
    backend = loaded.model.backend
    nll = correct = count = unigram_hits = 0.0
    for lo, hi, length in batches:
        tokens = np.asarray(part.read(lo * block, lo * block + (hi - lo) * length), np.int64)
        windows = tokens.reshape(hi - lo, length)
        inputs, targets = mask_tokens(windows, keys[lo:hi], vocab_size=loaded.mask_id,
                                      mask_id=loaded.mask_id, mask_prob=bc.mask_prob,
                                      mask_token_prob=bc.mask_token_prob,
                                      random_token_prob=bc.random_token_prob)
        s_nll, s_correct, s_count = loaded.model.eval_stats(
            loaded.params, backend.asarray(inputs), backend.asarray(targets))
        nll += s_nll
        correct += s_correct
        count += s_count
        unigram_hits += float((targets == unigram).sum())
        if on_progress is not None:
            on_progress(windows.size)
    loss = nll / max(count, 1.0)
    return {"split": split, "tokens": n_tokens, "windows": sum(hi - lo for lo, hi, _ in batches),
            "masked_tokens": int(count), "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": correct / max(count, 1.0),
            "unigram_accuracy": unigram_hits / max(count, 1.0)}


def most_frequent_token(corpus, chunk: int = 1 << 22) -> int:
    """The most frequent token of the corpus's train split (the unigram predictor)."""
    part = corpus.split("train")
    counts = np.zeros(corpus.vocab_size, dtype=np.int64)
    for a in range(0, part.n_tokens, chunk):
        ids = np.asarray(part.read(a, min(part.n_tokens, a + chunk)), dtype=np.int64)
        counts += np.bincount(ids, minlength=corpus.vocab_size)
    return int(np.argmax(counts))

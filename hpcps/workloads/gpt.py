"""GPT language modelling on a prepared token corpus (nanoGPT's setup)."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from hpcps.data.corpus import Corpus
from hpcps.data.sampler import (
    DROPOUT_STREAM,
    TRAIN_STREAM,
    VAL_STREAM,
    LMBatcher,
    sequence_keys,
)
from hpcps.errors import UserError
from hpcps.model.gpt import GPT
from hpcps.workloads.base import Workload


def load_split(corpus, name: str, in_memory_mb: int):
    """The split as an in-RAM array when it fits ``in_memory_mb``, else the lazy HDF5 view
    (the sampler then reads each window through the corpus's bounded chunk cache, so a
    split larger than RAM trains in constant memory)."""
    split = corpus.split(name)
    nbytes = split.n_tokens * np.dtype(corpus.token_dtype).itemsize
    if nbytes > in_memory_mb * 1024 * 1024:
        return split
    try:
        return split.load()
    except MemoryError:
        raise UserError(f"the {name} split of {corpus.path} ({nbytes / 2**20:,.0f} MiB) does not "
                        f"fit in this process's memory: set data.in_memory_mb below that to read "
                        f"it from the file instead") from None


def open_lm_corpus(cfg, kinds=("lm",)):
    if not cfg.data.path:
        raise UserError("config key 'data.path' is empty: prepare a corpus with `hpcps prepare` "
                        "and set data.path")
    corpus = Corpus.open(cfg.data.path)
    if corpus.kind not in kinds:
        raise UserError(f"corpus {cfg.data.path} is a '{corpus.kind}' corpus; workload "
                        f"'{cfg.workload}' needs {' or '.join(kinds)}")
    return corpus


class TokenStreamWorkload(Workload):
    """A workload that reads windows of one token stream (gpt, bert): the per-split
    batchers and moving arrays to the device."""
    recomputes = True

    def _device(self, array):
        return self.backend.asarray(array) if self.backend.is_gpu else array

    def batcher(self, split: str) -> LMBatcher:
        """Tokens are loaded on first use: server ranks never read the corpus."""
        if split not in self._batchers:
            tokens = load_split(self.corpus, split, self.cfg.data.in_memory_mb)
            stream = TRAIN_STREAM if split == "train" else VAL_STREAM
            self._batchers[split] = LMBatcher(tokens, self.block_size, self.seed, stream)
        return self._batchers[split]

    def flops_per_item(self):
        return self.model.flops_per_token() * self.block_size

    def data_bytes(self):
        """The splits ``load_split`` reads into RAM (the others stay in the file)."""
        item = np.dtype(self.corpus.token_dtype).itemsize
        sizes = [self.corpus.split(name).n_tokens * item for name in ("train", "val")]
        return {"corpus": sum(n for n in sizes if n <= self.cfg.data.in_memory_mb * 1024 * 1024)}

    def memory_bytes(self, batch, recompute=None):
        return self.model.memory_bytes(batch, recompute)

    def describe_stream(self, vocab_size: int) -> dict:
        """The checkpoint description both transformers share: shape and tokenizer."""
        return stream_description(self.name, self.cfg.model, self.layout.total, vocab_size,
                                  self.tokenizer)


class GPTWorkload(TokenStreamWorkload):
    name = "gpt"

    def __init__(self, cfg, backend, corpus):
        m = cfg.model
        self.cfg = cfg
        self.backend = backend
        self.vocab_size = int(corpus.vocab_size)
        self.block_size = m.block_size
        self.model = GPT(vocab_size=self.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                         n_embd=m.n_embd, block_size=m.block_size, bias=m.bias, dropout=m.dropout,
                         tie_embeddings=m.tie_embeddings, backend=backend,
                         recompute=cfg.train.recompute)
        self.layout = self.model.layout
        self.tokens_per_item = m.block_size
        self.seed = cfg.train.seed
        need = m.block_size + 1
        for split_name in ("train", "val"):
            n = corpus.split(split_name).n_tokens
            if n < need + 1:
                raise UserError(f"corpus {cfg.data.path}: the {split_name} split has {n} tokens, "
                                f"fewer than block_size+2 = {need + 1}")
        self.corpus = corpus
        self._batchers = {}
        self.dropout = m.dropout
        self.tokenizer = corpus.tokenizer

    def train_batch(self, step, lo, hi):
        return self.batcher("train").batch(step, lo, hi)

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        x, y = batch
        keys = None
        if self.dropout > 0:
            keys = sequence_keys(self.seed, DROPOUT_STREAM, step, lo, lo + len(x))
        loss = self.model.forward_backward(params, grads, self._device(x), self._device(y),
                                           dropout_keys=keys, on_grad_ready=on_grad_ready)
        return loss, float(y.size)

    def eval_sums(self, params, lo, hi):
        total, count = 0.0, 0
        chunk = max(1, self.cfg.train.batch_size)
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            x, y = self.batcher("val").batch(0, a, b)
            total += self.model.loss(params, self._device(x), self._device(y)) * y.size
            count += y.size
        return {"loss_sum": total, "count": float(count)}

    def finalize_eval(self, sums):
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def touched_rows(self, batch):
        spec = self.layout["wte"]
        if not spec.sparse_rows:
            return {}
        return {"wte": np.unique(batch[0])}

    def describe(self):
        return gpt_description(self.cfg.model, self.layout.total, self.vocab_size,
                               self.tokenizer)


def stream_description(workload: str, m, n_params: int, vocab_size: int, tokenizer) -> dict:
    """A token-stream transformer's checkpoint description (``m``: the ``model`` config)."""
    return {"workload": workload, "n_params": n_params, "vocab_size": vocab_size,
            "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
            "block_size": m.block_size, "bias": m.bias, "tokenizer": tokenizer.kind,
            "tokenizer_sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}


def gpt_description(m, n_params: int, vocab_size: int, tokenizer) -> dict:
    """What a GPT checkpoint records of its model, also for weights from ``hpcps import``
    (which must look exactly like a GPT trained on a corpus of that tokenizer)."""
    return {**stream_description(GPTWorkload.name, m, n_params, vocab_size, tokenizer),
            "tie_embeddings": m.tie_embeddings}


def build(cfg, backend, corpus=None):
    corpus = corpus or open_lm_corpus(cfg)
    return GPTWorkload(cfg, backend, corpus)

"""Skip-gram with negative sampling (word2vec) on any prepared LM corpus.

A training item is one (center, context) pair with k negatives, drawn as a pure
function of (seed, stream, step, item) like every other batch (see
``hpcps.data.sampler``), so BSP with W workers of b pairs equals one process
with W*b pairs. Per item: a center position c uniform over the (subsampled)
token sequence, a window r uniform in 1..window, an offset uniform in
{-r..-1, 1..r} (reflected at the ends), and k negatives from the train split's
unigram counts raised to ``neg_power``.

Subsampling (word2vec's ``-sample t``) drops each occurrence of a token with
frequency f with probability 1 - (sqrt(f/t) + 1) t/f, decided once per position
by a hash of (seed, position), so windows span the kept tokens as in word2vec.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from hpcps.data.sampler import TRAIN_STREAM, VAL_STREAM, _splitmix64, sequence_keys
from hpcps.errors import UserError
from hpcps.model.skipgram import SkipGram
from hpcps.workloads.base import Workload
from hpcps.workloads.gpt import open_lm_corpus

SUBSAMPLE_STREAM = 16          # per-position keep/drop draws (apart from the sampler's streams)
_WINDOW_MIX = np.uint64(0xA24BAED4963EE407)
_OFFSET_MIX = np.uint64(0x9FB21C651E98DF25)
_NEGATIVE_MIX = np.uint64(0xC13FA9A902A6328F)
_KEY_CHUNK = 1 << 22           # positions hashed at a time while subsampling
EVAL_CHUNK = 4096              # pairs per evaluation forward


def _uniform(keys: np.ndarray) -> np.ndarray:
    """uint64 keys -> float64 in [0, 1) (top 53 bits)."""
    return (keys >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0 ** 53)


def keep_probability(counts: np.ndarray, threshold: float) -> np.ndarray:
    """word2vec's subsampling: P(keep) = (sqrt(f/t) + 1) t/f, at most 1, per token."""
    if threshold <= 0:
        return np.ones(len(counts))
    freq = counts / max(counts.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = threshold / freq
        keep = (np.sqrt(1.0 / ratio) + 1.0) * ratio
    keep[counts == 0] = 1.0
    return np.minimum(keep, 1.0)


def subsample(tokens: np.ndarray, keep: np.ndarray, seed: int, split_index: int) -> np.ndarray:
    """The tokens whose per-position draw falls below their keep probability."""
    parts = []
    for a in range(0, len(tokens), _KEY_CHUNK):
        b = min(len(tokens), a + _KEY_CHUNK)
        u = _uniform(sequence_keys(seed, SUBSAMPLE_STREAM, split_index, a, b))
        chunk = tokens[a:b]
        parts.append(chunk[u < keep[chunk]])
    return np.concatenate(parts) if parts else tokens[:0]


def negative_cdf(counts: np.ndarray, power: float) -> np.ndarray:
    weights = np.where(counts > 0, counts.astype(np.float64) ** power, 0.0)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


class PairSampler:
    """(centers (n,), targets (n, 1 + k)) with the context in column 0 of targets."""

    def __init__(self, seq: np.ndarray, window: int, negatives: int, cdf: np.ndarray,
                 seed: int, stream: int):
        self.seq, self.window, self.negatives = seq, window, negatives
        self.cdf, self.seed, self.stream = cdf, seed, stream
        self.n = len(seq)

    def batch(self, step: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        keys = sequence_keys(self.seed, self.stream, step, lo, hi)
        with np.errstate(over="ignore"):
            center = (keys % np.uint64(self.n)).astype(np.int64)
            r = (_splitmix64(keys ^ _WINDOW_MIX) % np.uint64(self.window)).astype(np.int64) + 1
            d = (_splitmix64(keys ^ _OFFSET_MIX) % (2 * r).astype(np.uint64)).astype(np.int64)
        offset = np.where(d < r, d - r, d - r + 1)                 # -r..-1, 1..r
        context = center + offset
        outside = (context < 0) | (context >= self.n)
        context[outside] = center[outside] - offset[outside]      # reflect at the ends
        targets = np.empty((hi - lo, 1 + self.negatives), dtype=np.int64)
        targets[:, 0] = self.seq[context]
        for j in range(self.negatives):
            with np.errstate(over="ignore"):
                mixed = _splitmix64(keys ^ (_NEGATIVE_MIX * np.uint64(j + 1)))
            targets[:, 1 + j] = np.searchsorted(self.cdf, _uniform(mixed), side="right")
        return self.seq[center].astype(np.int64), targets


class SkipGramWorkload(Workload):
    name = "skipgram"

    def __init__(self, cfg, backend, corpus):
        self.cfg, self.backend, self.corpus = cfg, backend, corpus
        sg = cfg.skipgram
        self.window, self.negatives = sg.window, sg.negatives
        self.vocab_size = int(corpus.vocab_size)
        self.model = SkipGram(self.vocab_size, sg.dim, backend)
        self.layout = self.model.layout
        self.seed = cfg.train.seed
        self.tokenizer = corpus.tokenizer
        need = 2 * self.window + 2
        for split_name in ("train", "val"):
            n = corpus.split(split_name).n_tokens
            if n < need:
                raise UserError(f"corpus {cfg.data.path}: the {split_name} split has {n} tokens, "
                                f"fewer than 2 * skipgram.window + 2 = {need}")
        self._samplers: dict = {}
        self._tokens: dict = {}
        self._counts = None

    # -- data (loaded on first use: server ranks never read the corpus) ----------------
    def _load(self, split: str) -> np.ndarray:
        if split not in self._tokens:
            self._tokens[split] = self._read(split)
        return self._tokens[split]

    def _read(self, split: str) -> np.ndarray:
        part = self.corpus.split(split)
        limit = self.cfg.data.in_memory_mb * 1024 * 1024
        if part.n_tokens * np.dtype(self.corpus.token_dtype).itemsize > limit:
            raise UserError(f"skip-gram samples the {split} split at random and keeps it in "
                            f"memory: it is larger than data.in_memory_mb = "
                            f"{self.cfg.data.in_memory_mb}; raise that key")
        return part.load()

    def counts(self) -> np.ndarray:
        """Token counts of the train split (negatives and subsampling follow them)."""
        if self._counts is None:
            self._counts = np.bincount(self._load("train"), minlength=self.vocab_size)
        return self._counts

    def sampler(self, split: str) -> PairSampler:
        if split not in self._samplers:
            sg = self.cfg.skipgram
            tokens = self._load(split)
            keep = keep_probability(self.counts(), sg.subsample)
            seq = subsample(tokens, keep, self.seed, 0 if split == "train" else 1)
            if len(seq) < 2 * self.window + 2:
                raise UserError(f"skipgram.subsample = {sg.subsample:g} leaves {len(seq)} tokens "
                                f"of the {split} split: too few for the window; lower it or use 0")
            stream = TRAIN_STREAM if split == "train" else VAL_STREAM
            self._samplers[split] = PairSampler(seq, self.window, self.negatives,
                                                negative_cdf(self.counts(), sg.neg_power),
                                                self.seed, stream)
        return self._samplers[split]

    def _device(self, array):
        return self.backend.asarray(array) if self.backend.is_gpu else array

    # -- the Workload interface -----------------------------------------------------------
    def train_batch(self, step, lo, hi):
        return self.sampler("train").batch(step, lo, hi)

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        centers, targets = batch
        loss = self.model.forward_backward(params, grads, self._device(centers),
                                           self._device(targets))
        return loss, float(len(centers))

    def touched_rows(self, batch):
        centers, targets = batch
        return {"emb_in": np.unique(centers), "emb_out": np.unique(targets)}

    def eval_sums(self, params, lo, hi):
        loss_sum, hits = 0.0, 0.0
        for a in range(lo, hi, EVAL_CHUNK):
            b = min(hi, a + EVAL_CHUNK)
            centers, targets = self.sampler("val").batch(0, a, b)
            loss, hit = self.model.pair_stats(params, self._device(centers),
                                              self._device(targets))
            loss_sum += loss
            hits += hit
        return {"loss_sum": loss_sum, "hits": hits, "count": float(max(hi - lo, 0))}

    def finalize_eval(self, sums):
        count = max(sums["count"], 1.0)
        return {"val_loss": sums["loss_sum"] / count,
                # the true context outscores all k negatives (chance: 1 / (k + 1))
                "val_pair_accuracy": sums["hits"] / count}

    def flops_per_item(self):
        return self.model.flops_per_pair(self.negatives)

    def memory_bytes(self, batch, recompute=None):
        """The final evaluation runs up to EVAL_CHUNK pairs at a time."""
        chunk = EVAL_CHUNK if self.cfg.train.eval_steps else 0
        return self.model.memory_bytes(batch, self.negatives, eval_batch=chunk)

    def data_bytes(self):
        """Both splits stay in RAM, each with its subsampled sequence (at most as long)."""
        item = np.dtype(self.corpus.token_dtype).itemsize
        tokens = sum(self.corpus.split(name).n_tokens for name in ("train", "val"))
        return {"corpus": 2 * tokens * item}

    def describe(self):
        sg = self.cfg.skipgram
        return {"workload": self.name, "n_params": self.layout.total,
                "vocab_size": self.vocab_size, "dim": sg.dim, "tokenizer": self.tokenizer.kind,
                "tokenizer_sha256": hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()}


def init_loss(negatives: int) -> float:
    """Every pair's loss with emb_out = 0 (the initialisation): (k + 1) log 2."""
    return (negatives + 1) * math.log(2.0)


def build(cfg, backend, corpus=None):
    corpus = corpus or open_lm_corpus(cfg)
    return SkipGramWorkload(cfg, backend, corpus)

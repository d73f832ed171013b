"""GPT (nanoGPT / GPT-2 shape) on the flat parameter buffer with a hand-written backward.

token + position embedding -> n_layer pre-LayerNorm blocks (causal self-attention,
MLP 4x with tanh-GELU) -> final LayerNorm -> LM head (tied to ``wte`` by default)
-> cross-entropy (mean over targets != -1). GELU is GPT-2's tanh approximation
(NumPy has no erf; nanoGPT's exact-erf ``nn.GELU()`` differs from it by < 1e-3),
and the PyTorch reference in ``hpcps.bench.torch_gpt`` uses the same. Dropout (embedding, attention
probabilities, both residual branches) uses per-sequence keys so that masks do
not depend on how a batch is split across workers.

On the CPU a batch is cut into ``threads`` shards (default: one per BLAS thread)
run by parallel threads with single-threaded BLAS: NumPy's elementwise work is
single-threaded, so this is what puts every core to work outside the GEMMs. The
shards' gradients are summed range by range as they become final, before
``on_grad_ready`` reports the range.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional, Sequence

import numpy as np

from hpcps.backend import CPU, Backend
from hpcps.errors import UserError
from hpcps.model.attention import self_attention_backward, self_attention_forward
from hpcps.model.blas import blas_threads, blas_threads_limited, can_set_blas_threads
from hpcps.model.checks import check_dropout_keys, check_flat_buffer
from hpcps.model.layers import (
    dropout_mask,
    embedding_backward,
    gelu_backward,
    gelu_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_backward,
    linear_forward,
)
from hpcps.model.layout import GradReady, ParamLayout, grad_ready_notifier
from hpcps.model.lm_head import head_loss
from hpcps.model.memory import TransformerShape, model_bytes
from hpcps.model.recompute import BlockActivations, check_recompute
from hpcps.model.workspace import Workspace

_MAX_WORKSPACES = 8   # (B, T, dtype, shard) kept warm: train and eval shards, sampling


def build_layout(*, vocab_size: int, n_layer: int, n_embd: int, block_size: int, bias: bool,
                 tie_embeddings: bool) -> ParamLayout:
    """wte, wpe, then each block contiguous (so backward finishes ranges in reverse), then lnf."""
    c, std = n_embd, 0.02
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    lay = ParamLayout()
    lay.add("wte", (vocab_size, c), std=std, sparse_rows=not tie_embeddings)
    lay.add("wpe", (block_size, c), std=std)

    def norm(name: str) -> None:
        lay.add(name + ".w", (c,), value=1.0)
        if bias:
            lay.add(name + ".b", (c,))

    def linear(name: str, out_f: int, in_f: int, w_std: float) -> None:
        lay.add(name + ".w", (out_f, in_f), std=w_std)
        if bias:
            lay.add(name + ".b", (out_f,))

    for i in range(n_layer):
        p = f"h{i}."
        norm(p + "ln1")
        linear(p + "attn.qkv", 3 * c, c, std)
        linear(p + "attn.proj", c, c, resid_std)
        norm(p + "ln2")
        linear(p + "mlp.fc", 4 * c, c, std)
        linear(p + "mlp.proj", c, 4 * c, resid_std)
    norm("lnf")
    if not tie_embeddings:
        lay.add("lm_head.w", (vocab_size, c), std=std)
    return lay


def _address(buf) -> int:
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data.ptr


class GPT:
    """A GPT-2-style decoder on one flat parameter buffer: ``forward_backward`` writes the
    whole gradient into a flat buffer of the same layout (named views, ``layout``), so the
    runtime can push it, or any range of it, without knowing the model."""

    def __init__(self, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 block_size: int, bias: bool = False, dropout: float = 0.0,
                 tie_embeddings: bool = True, backend: Backend = CPU,
                 threads: Optional[int] = None, recompute: str = "none") -> None:
        """threads (CPU only): the batch is cut into this many shards that run in
        parallel threads, each with single-threaded BLAS (elementwise NumPy work then
        uses every core too). None: as many as NumPy's BLAS threads when their number
        can be controlled, else 1; 1: one shard, BLAS threads as configured.
        recompute: what the forward keeps for the backward (``hpcps.model.recompute``)."""
        for key, val in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head),
                         ("n_embd", n_embd), ("block_size", block_size)):
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
                raise UserError(f"GPT {key} must be a positive integer, got {val!r}")
        if n_embd % n_head:
            raise UserError(f"GPT n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"GPT dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.n_layer, self.n_head = int(vocab_size), int(n_layer), int(n_head)
        self.n_embd, self.block_size = int(n_embd), int(block_size)
        self.bias, self.dropout, self.tie_embeddings = bool(bias), float(dropout), tie_embeddings
        self.backend = backend
        self.xp = backend.xp
        self.recompute = check_recompute(recompute)
        self.layout = build_layout(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd,
                                   block_size=block_size, bias=bias, tie_embeddings=tie_embeddings)
        self._workspaces: OrderedDict = OrderedDict()
        self._view_cache: OrderedDict = OrderedDict()
        self._ready_ranges = self._grad_ready_ranges()
        self.threads = self._resolve_threads(threads)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._shard_grads: dict = {}

    # -- public API --------------------------------------------------------------------

    def init_params(self, seed: int):
        return self.backend.asarray(self.layout.init_slice(seed))

    def forward_backward(self, params, grads, idx, targets,
                         dropout_keys: Optional[Sequence[int]] = None,
                         on_grad_ready: Optional[GradReady] = None) -> float:
        """Overwrite grads with d(mean loss)/d(params); return the loss. ``on_grad_ready(lo,
        hi)`` hears of each gradient range as soon as backward has finished it."""
        notify = grad_ready_notifier(self._ready_ranges, on_grad_ready)
        idx, targets = self._check_batch(idx, targets)
        self._check_buffer(params, "params")
        if grads.shape != params.shape or grads.dtype != params.dtype:
            raise UserError(f"grads buffer {grads.shape} {grads.dtype} does not match params "
                            f"{params.shape} {params.dtype}")
        keys = self._check_keys(dropout_keys, idx.shape[0])
        shards = self._shard_slices(idx.shape[0])
        P, G = self._views(params), self._views(grads)
        if len(shards) == 1:
            ws = self._workspace(idx.shape, params.dtype)
            return float(self._step(P, G, idx, targets, keys, ws, 1.0, notify))
        return self._sharded_step(P, grads, idx, targets, keys, shards, notify)

    def loss(self, params, idx, targets) -> float:
        idx, targets = self._check_batch(idx, targets)
        self._check_buffer(params, "params")
        P = self._views(params)
        shards = self._shard_slices(idx.shape[0])
        counts, total = self._target_counts(targets, shards)
        tasks = []
        for i, sl in enumerate(shards):
            ws = self._workspace(idx[sl].shape, params.dtype, i)
            tasks.append(lambda sl=sl, ws=ws: self._eval_loss(P, idx[sl], targets[sl], ws))
        losses = self._run_parallel(tasks)
        return sum(float(v) * c for v, c in zip(losses, counts)) / total

    def logits(self, params, idx):
        idx, _ = self._check_batch(idx, None)
        self._check_buffer(params, "params")
        ws = self._workspace(idx.shape, params.dtype)
        P = self._views(params)
        x, _ = self._forward(P, idx, None, ws, for_backward=False)
        head = P["wte"] if self.tie_embeddings else P["lm_head.w"]
        logits, _ = layernorm_linear_forward(x, P["lnf.w"], P.get("lnf.b"), head, ws=ws,
                                             name="head")
        return logits.reshape(idx.shape + (self.vocab_size,)).copy()

    def flops_per_token(self) -> float:
        """6 N + 12 L C T (nanoGPT's estimate; T = block_size): N counts every parameter
        except the position table (and the token table when untied: a lookup, no matmul)."""
        n = self.layout.total - self.layout["wpe"].size
        if not self.tie_embeddings:
            n -= self.layout["wte"].size
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * self.block_size

    def memory_bytes(self, batch: int, recompute: Optional[str] = None) -> dict:
        """{term: bytes} a training step over ``batch`` sequences holds beyond the params and
        grads buffers (activations, logits, scratch, extra shard gradients), with this
        model's recomputation or the one given."""
        shape = TransformerShape(self.n_layer, self.n_head, self.n_embd, self.block_size,
                                 self.vocab_size, self.bias, self.dropout)
        sizes = [sl.stop - sl.start for sl in self._shard_slices(batch)]
        return model_bytes(shape, sizes, recompute or self.recompute, self.layout.total)

    # -- batch shards in threads (CPU) ---------------------------------------------------

    def _resolve_threads(self, threads: Optional[int]) -> int:
        if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
            raise UserError(f"GPT threads must be a positive integer or None, got {threads!r}")
        if self.xp is not np:
            return 1
        if threads is None:
            return blas_threads() if can_set_blas_threads() else 1
        return int(threads)

    def _shard_slices(self, batch: int) -> list:
        n = min(self.threads, batch)
        sizes = [batch // n + (1 if i < batch % n else 0) for i in range(n)]
        starts = np.cumsum([0] + sizes)
        return [slice(int(starts[i]), int(starts[i + 1])) for i in range(n)]

    def _target_counts(self, targets, shards) -> tuple:
        """Counted targets per shard and in all (at least 1, as the loss divides by it)."""
        if len(shards) == 1:
            return [1], 1
        counts = [int((targets[sl] != -1).sum()) for sl in shards]
        return counts, max(sum(counts), 1)

    def _run_parallel(self, tasks: list) -> list:
        """tasks[0] on this thread, the others on the pool, all with single-threaded BLAS;
        their results in order. A failing worker's exception is the one re-raised."""
        if len(tasks) == 1:
            return [tasks[0]()]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="gpt-shard")
        with blas_threads_limited(1):
            futures = [self._pool.submit(task) for task in tasks[1:]]
            try:
                first = tasks[0]()
            except BaseException:
                wait(futures)   # never leave a worker writing into buffers we hand out again
                for f in futures:
                    if f.exception() is not None:
                        raise f.exception()
                raise
            return [first] + [f.result() for f in futures]

    def _sharded_step(self, P, grads, idx, targets, keys, shards, notify) -> float:
        """forward_backward over batch shards: shard 0 writes ``grads``, the others private
        buffers, added in as each range becomes final and before on_grad_ready sees it.
        Each shard's loss gradient is weighted by its share of the counted targets."""
        counts, total = self._target_counts(targets, shards)
        dtype = grads.dtype
        extra = [self._shard_grad_buffer(i, dtype) for i in range(1, len(shards))]
        done = [[threading.Event() for _ in self._ready_ranges] for _ in extra]
        failed = threading.Event()

        def reduce_and_notify(step: int) -> None:
            lo, hi = self._ready_ranges[step]
            for events, buf in zip(done, extra):
                while not events[step].wait(0.05):
                    if failed.is_set():
                        raise RuntimeError("a batch shard failed during its backward")
                grads[lo:hi] += buf[lo:hi]
            notify(step)

        def shard_task(i: int):
            # workspaces and views are looked up here, on the calling thread
            sl = shards[i]
            ws = self._workspace(idx[sl].shape, dtype, i)
            G = self._views(grads if i == 0 else extra[i - 1])
            k = None if keys is None else keys[sl]
            report = reduce_and_notify if i == 0 else (lambda step: done[i - 1][step].set())

            def run():
                try:
                    return self._step(P, G, idx[sl], targets[sl], k, ws, counts[i] / total,
                                      report)
                except BaseException:
                    failed.set()
                    raise
            return run

        losses = self._run_parallel([shard_task(i) for i in range(len(shards))])
        return sum(float(v) * c for v, c in zip(losses, counts)) / total

    def _shard_grad_buffer(self, shard: int, dtype):
        key = (shard, np.dtype(dtype).str)
        buf = self._shard_grads.get(key)
        if buf is None:
            buf = self.xp.empty(self.layout.total, dtype=dtype)
            self._shard_grads[key] = buf
        return buf

    # -- checks and caches -------------------------------------------------------------

    def _check_batch(self, idx, targets):
        xp = self.xp
        idx = xp.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise UserError(f"idx must be a (B, T) integer array, got shape {idx.shape} "
                            f"{idx.dtype}")
        if not 1 <= idx.shape[1] <= self.block_size:
            raise UserError(f"sequence length {idx.shape[1]} is outside 1..block_size "
                            f"({self.block_size})")
        if idx.shape[0] < 1:
            raise UserError("idx holds no sequences")
        if xp is np and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise UserError(f"token ids must be in 0..{self.vocab_size - 1}, got "
                            f"{int(idx.min())}..{int(idx.max())}")
        if targets is not None:
            targets = xp.asarray(targets)
            if targets.shape != idx.shape or targets.dtype.kind not in "iu":
                raise UserError(f"targets must be an integer array shaped like idx {idx.shape}, "
                                f"got {targets.shape} {targets.dtype}")
            if xp is np and (targets.min() < -1 or targets.max() >= self.vocab_size):
                raise UserError(f"targets must be in 0..{self.vocab_size - 1} or -1 (ignored)")
        return idx, targets

    def _check_buffer(self, buf, what: str) -> None:
        check_flat_buffer(buf, self.layout.total, what)

    def _check_keys(self, keys, batch: int):
        return check_dropout_keys(keys, batch, self.dropout, "sequence")

    def _views(self, buf) -> dict:
        # the cached views keep ``buf`` alive, so an address cannot be reused by another buffer
        key = (_address(buf), buf.dtype.str, buf.shape)
        views = self._view_cache.get(key)
        if views is None:
            views = self.layout.views(buf)
            self._view_cache[key] = views
            if len(self._view_cache) > _MAX_WORKSPACES:
                self._view_cache.popitem(last=False)
        return views

    def _workspace(self, shape, dtype, shard: int = 0) -> Workspace:
        key = (tuple(shape), np.dtype(dtype).str, shard)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = Workspace(self.xp)
            self._workspaces[key] = ws
            if len(self._workspaces) > _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        self._workspaces.move_to_end(key)
        return ws

    def _grad_ready_ranges(self) -> list:
        """[lo, hi) ranges in the order backward finishes them: head / lnf, blocks
        L-1..0, embeddings."""
        lay = self.layout
        tail = lay["lnf.w"].offset
        ranges = [(tail, lay.total)]
        for i in reversed(range(self.n_layer)):
            names = [s for s in lay.specs if s.name.startswith(f"h{i}.")]
            ranges.append((names[0].offset, names[-1].end))
        ranges.append((0, lay["wpe"].end))
        return ranges

    def _mask(self, keys, site: int, shape: tuple, dtype):
        if keys is None:
            return None
        return dropout_mask(self.xp, keys, site, shape, self.dropout, dtype)

    # -- forward / backward ------------------------------------------------------------

    def _step(self, P, G, idx, targets, keys, ws: Workspace, dloss: float, notify):
        x, caches = self._forward(P, idx, keys, ws)
        # every gradient tensor is overwritten by its one backward, except the token table
        # (tied: the head writes it, the lookup adds; untied: only the lookup adds)
        if not self.tie_embeddings:
            G["wte"].fill(0)
        head = "wte" if self.tie_embeddings else "lm_head.w"
        loss, dx = head_loss(x, P["lnf.w"], P.get("lnf.b"), P[head], targets, ws,
                             grads=(G["lnf.w"], G.get("lnf.b"), G[head]), dloss=dloss)
        self._backward(G, dx, caches, ws, notify)
        return loss

    def _eval_loss(self, P, idx, targets, ws: Workspace):
        x, _ = self._forward(P, idx, None, ws, for_backward=False)
        head = P["wte"] if self.tie_embeddings else P["lm_head.w"]
        return head_loss(x, P["lnf.w"], P.get("lnf.b"), head, targets, ws)[0]

    def _forward(self, P: dict, idx, keys, ws: Workspace, for_backward: bool = True):
        """The residual stream after the last block, and what the backward needs."""
        # each LayerNorm is fused into the linear that reads it (ln1 -> qkv, ln2 -> fc, lnf -> head)
        xp = self.xp
        b, t = idx.shape
        c, h = self.n_embd, self.n_head
        dt = P["wte"].dtype
        x = ws.get("x", (b, t, c), dt)      # the residual stream, updated in place
        xp.take(P["wte"], idx, axis=0, out=x)
        x += P["wpe"][:t]
        emb_mask = self._mask(keys, 0, (t, c), dt)
        if emb_mask is not None:
            x *= emb_mask
        # branch outputs are added to x at once and not needed by the backward: shared scratch
        branch = ws.get("tmp.branch", (b * t, c), dt)
        blocks = BlockActivations(self.recompute, ws, for_backward)
        for i in range(self.n_layer):
            blocks.forward(i, x, lambda xi, prefix, i=i: self._block_forward(
                P, xi, i, keys, ws, branch, prefix, blocks.keep_probs))
        return x, (idx, emb_mask, blocks)

    def _block_forward(self, P: dict, x, i: int, keys, ws: Workspace, branch, prefix: str,
                       keep_probs: bool) -> tuple:
        """x += attn(LN1 x); x += mlp(LN2 x) for block i, activations under ``prefix``."""
        b, t, c = x.shape
        h, dt = self.n_head, x.dtype
        p = f"h{i}."
        att_mask = self._mask(keys, 1 + 3 * i, (h, t, t), dt)
        attn_mask = self._mask(keys, 2 + 3 * i, (t, c), dt)
        mlp_mask = self._mask(keys, 3 + 3 * i, (t, c), dt)
        a, attn = self_attention_forward(x, P[p + "attn.qkv.w"], P.get(p + "attn.qkv.b"),
                                         P[p + "attn.proj.w"], P.get(p + "attn.proj.b"), h,
                                         causal=True, ln=(P[p + "ln1.w"], P.get(p + "ln1.b")),
                                         attn_dropout=att_mask, out=branch, ws=ws,
                                         name=prefix + "attn", keep_probs=keep_probs)
        if attn_mask is not None:
            a *= attn_mask
        x += a
        # the fc output is only the GELU input (GELU caches its derivative): shared scratch
        f, fc = layernorm_linear_forward(x, P[p + "ln2.w"], P.get(p + "ln2.b"),
                                         P[p + "mlp.fc.w"], P.get(p + "mlp.fc.b"),
                                         out=ws.get("tmp.fc.out", (b * t, 4 * c), dt),
                                         ws=ws, name=prefix + "fc")
        g, gelu = gelu_forward(f, ws, prefix + "gelu")
        m, proj = linear_forward(g, P[p + "mlp.proj.w"], P.get(p + "mlp.proj.b"), ws,
                                 prefix + "mproj", out=branch)
        if mlp_mask is not None:
            m *= mlp_mask
        x += m
        return attn, attn_mask, fc, gelu, proj, mlp_mask

    def _backward(self, G: dict, dx, caches, ws: Workspace, notify) -> None:
        """dx: the gradient of the last block's output (the head's input-gradient buffer,
        the residual-stream gradient from here on)."""
        idx, emb_mask, blocks = caches
        b, t = idx.shape
        notify(0)
        for i in reversed(range(self.n_layer)):
            p = f"h{i}."
            attn, attn_mask, fc, gelu, proj, mlp_mask = blocks.cache(i)
            dm = dx if mlp_mask is None else self._masked(dx, mlp_mask, ws)
            dg = linear_backward(dm, proj, G[p + "mlp.proj.w"], G.get(p + "mlp.proj.b"), ws,
                                 "bwd.mproj", accumulate=False)
            df = gelu_backward(dg, gelu, ws, "bwd.gelu")
            dx += layernorm_linear_backward(df, fc, G[p + "ln2.w"], G.get(p + "ln2.b"),
                                            G[p + "mlp.fc.w"], G.get(p + "mlp.fc.b"), ws,
                                            "bwd.fc", accumulate=False)
            da = dx if attn_mask is None else self._masked(dx, attn_mask, ws)
            dx += self_attention_backward(da, attn, G[p + "attn.qkv.w"], G.get(p + "attn.qkv.b"),
                                          G[p + "attn.proj.w"], G.get(p + "attn.proj.b"),
                                          (G[p + "ln1.w"], G.get(p + "ln1.b")), ws, "bwd.attn",
                                          accumulate=False)
            notify(self.n_layer - i)
        if emb_mask is not None:
            dx *= emb_mask
        self.xp.sum(dx, axis=0, out=G["wpe"][:t])
        G["wpe"][t:] = 0
        embedding_backward(dx, idx, G["wte"], ws, "bwd.emb")
        notify(self.n_layer + 1)

    def _masked(self, d, mask, ws: Workspace):
        out = ws.get("bwd.masked", d.shape, d.dtype)
        self.xp.multiply(d, mask, out=out)
        return out

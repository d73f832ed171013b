"""Transformer blocks shared by the BERT-style encoder and the T5-style encoder-decoder.

Every block is pre-LayerNorm (as GPT-2 / T5: x += f(LN(x))), works on ``xp`` arrays
of any float dtype and follows the layer conventions of ``hpcps.model.layers``:
``forward -> (out, cache)``, ``backward(dout, cache, grads...) -> dinput``; with
``accumulate=False`` (the default here) every parameter gradient is overwritten,
since each block tensor is used once per step.

- ``encoder_block_*``: self-attention without the causal mask, keys masked by an
  optional additive ``key_bias`` (padding), then the 4x GELU MLP.
- ``decoder_block_*``: causal self-attention, cross-attention (queries from the
  decoder, keys / values from the encoder output, padded source keys masked),
  then the MLP. Its backward also returns the gradient w.r.t. the encoder output.
- ``decoder_block_step``: the same decoder block, forward only, for one new
  position with cached self-attention keys / values (incremental decoding).

Positions are learned absolute embeddings (added by the models), not T5's
relative position bias: the attention core of ``hpcps.model.attention`` does not
return the score gradient a learned bias table would need.

Parameters of a block are named ``{prefix}ln1.w``, ``{prefix}attn.qkv.w`` ... in a
dict ``P`` of views (``layout.views(flat)``); biases are looked up with
``P.get`` so layouts without biases work unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hpcps.backend import array_module
from hpcps.model import attention
from hpcps.model.attention import attention_backward, attention_forward, split_heads
from hpcps.model.layers import (
    dropout_mask,
    gelu_backward,
    gelu_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_backward,
    linear_forward,
)
from hpcps.model.layout import ParamLayout
from hpcps.model.workspace import Workspace, scratch

INIT_STD = 0.02


# -- layout helpers ----------------------------------------------------------------------

def add_norm(lay: ParamLayout, name: str, c: int, bias: bool) -> None:
    lay.add(name + ".w", (c,), value=1.0)
    if bias:
        lay.add(name + ".b", (c,))


def add_linear(lay: ParamLayout, name: str, out_f: int, in_f: int, std: float, bias: bool) -> None:
    lay.add(name + ".w", (out_f, in_f), std=std)
    if bias:
        lay.add(name + ".b", (out_f,))


def add_encoder_block(lay: ParamLayout, p: str, c: int, bias: bool, resid_std: float) -> None:
    add_norm(lay, p + "ln1", c, bias)
    add_linear(lay, p + "attn.qkv", 3 * c, c, INIT_STD, bias)
    add_linear(lay, p + "attn.proj", c, c, resid_std, bias)
    add_norm(lay, p + "ln2", c, bias)
    add_linear(lay, p + "mlp.fc", 4 * c, c, INIT_STD, bias)
    add_linear(lay, p + "mlp.proj", c, 4 * c, resid_std, bias)


def add_decoder_block(lay: ParamLayout, p: str, c: int, bias: bool, resid_std: float) -> None:
    add_norm(lay, p + "ln1", c, bias)
    add_linear(lay, p + "attn.qkv", 3 * c, c, INIT_STD, bias)
    add_linear(lay, p + "attn.proj", c, c, resid_std, bias)
    add_norm(lay, p + "ln2", c, bias)
    add_linear(lay, p + "cross.q", c, c, INIT_STD, bias)
    add_linear(lay, p + "cross.kv", 2 * c, c, INIT_STD, bias)
    add_linear(lay, p + "cross.proj", c, c, resid_std, bias)
    add_norm(lay, p + "ln3", c, bias)
    add_linear(lay, p + "mlp.fc", 4 * c, c, INIT_STD, bias)
    add_linear(lay, p + "mlp.proj", c, 4 * c, resid_std, bias)


def block_range(lay: ParamLayout, prefix: str) -> tuple[int, int]:
    """[lo, hi) of the tensors named ``prefix*`` (a block is added contiguously)."""
    specs = [s for s in lay.specs if s.name.startswith(prefix)]
    return specs[0].offset, specs[-1].end


# -- masks -------------------------------------------------------------------------------

def key_padding_bias(xp, lengths, tk: int, dtype):
    """(B, 1, 1, tk) additive attention mask: 0 for keys j < lengths[b], -inf after."""
    lengths = xp.asarray(lengths)
    keep = xp.arange(tk)[None, :] < lengths[:, None]
    bias = xp.zeros(keep.shape, dtype=dtype)
    bias[~keep] = -np.inf
    return bias[:, None, None, :]


class Dropout:
    """Per-sequence dropout masks of one forward (``keys`` None: no dropout).

    A mask depends only on (key, site, element index) via ``layers.dropout_mask``.
    Attention-probability masks are drawn at ``full`` (H, Tq_max, Tk_max) size and
    sliced, so a sequence gets the same mask however far its batch was padded.
    """

    def __init__(self, xp, keys, p: float, dtype) -> None:
        self.xp, self.p, self.dtype = xp, p, dtype
        self.keys = None if keys is None or p == 0.0 else np.asarray(keys)

    def mask(self, site: int, shape: tuple, full: Optional[tuple] = None):
        if self.keys is None:
            return None
        m = dropout_mask(self.xp, self.keys, site, full or shape, self.p, self.dtype)
        if full is None:
            return m
        return m[(slice(None),) + tuple(slice(0, n) for n in shape)]


def masked(d, mask, ws: Workspace, name: str = "bwd.masked"):
    """d * mask in a scratch buffer (d itself when there is no mask)."""
    if mask is None:
        return d
    out = ws.get(name, d.shape, d.dtype)
    ws.xp.multiply(d, mask, out=out)
    return out


# -- attention sublayers -----------------------------------------------------------------

def self_attention_forward(x, ln_w, ln_b, w_qkv, b_qkv, w_proj, b_proj, n_head: int, *,
                           causal: bool, key_bias=None, attn_dropout=None, out=None,
                           ws: Workspace, name: str, keep_probs: bool = True):
    """proj(attention(LN(x) W_qkv)) with an optional additive key mask (padding): the
    pre-LN sublayer of ``attention.self_attention_forward`` in this module's argument order."""
    return attention.self_attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, n_head,
                                            causal=causal, ln=(ln_w, ln_b), attn_bias=key_bias,
                                            attn_dropout=attn_dropout, out=out, ws=ws, name=name,
                                            keep_probs=keep_probs)


def self_attention_backward(dout, cache, d_ln_w, d_ln_b, dw_qkv, db_qkv, dw_proj, db_proj, *,
                            ws: Workspace, name: str, accumulate: bool = False):
    """dx of ``self_attention_forward``; parameter gradients stored (or added)."""
    return attention.self_attention_backward(dout, cache, dw_qkv, db_qkv, dw_proj, db_proj,
                                             d_ln=(d_ln_w, d_ln_b), ws=ws, name=name,
                                             accumulate=accumulate)


def cross_attention_forward(x, enc, ln_w, ln_b, w_q, b_q, w_kv, b_kv, w_proj, b_proj,
                            n_head: int, *, key_bias=None, attn_dropout=None, out=None,
                            ws: Workspace, name: str, keep_probs: bool = True):
    """proj(attention(q = LN(x) W_q, k | v = enc W_kv)); x (B, Tq, C), enc (B, Tk, C).

    key_bias (B, 1, 1, Tk): -inf on padded encoder positions. keep_probs: see
    ``attention.attention_forward``.
    """
    b, t, c = x.shape
    s = enc.shape[1]
    hs, dt = c // n_head, x.dtype
    q, q_cache = layernorm_linear_forward(x, ln_w, ln_b, w_q, b_q, ws=ws, name=name + ".q")
    kv, kv_cache = linear_forward(enc, w_kv, b_kv, ws, name + ".kv")
    kvh = kv.reshape(b, s, 2, n_head, hs)
    k, v = (kvh[:, :, i].transpose(0, 2, 1, 3) for i in range(2))
    y = ws.get(name + ".y", (b, t, n_head, hs), dt)
    _, att_cache = attention_forward(split_heads(q.reshape(b, t, c), n_head), k, v, causal=False,
                                     attn_bias=key_bias, dropout=attn_dropout,
                                     out=y.transpose(0, 2, 1, 3), ws=ws, name=name,
                                     keep_probs=keep_probs)
    proj, proj_cache = linear_forward(y.reshape(b, t, c), w_proj, b_proj, ws, name + ".proj", out)
    return proj, (q_cache, kv_cache, att_cache, proj_cache, n_head, s)


def cross_attention_backward(dout, cache, d_ln_w, d_ln_b, dw_q, db_q, dw_kv, db_kv, dw_proj,
                             db_proj, *, ws: Workspace, name: str, accumulate: bool = False):
    """(dx, d_enc) of ``cross_attention_forward``."""
    q_cache, kv_cache, att_cache, proj_cache, n_head, s = cache
    b, t, c = dout.shape
    hs, dt = c // n_head, dout.dtype
    dy = linear_backward(dout, proj_cache, dw_proj, db_proj, ws, name + ".proj",
                         accumulate=accumulate)
    dq = ws.get(name + ".dq", (b, t, c), dt)
    dkv = ws.get(name + ".dkv", (b, s, 2, n_head, hs), dt)
    dk, dv = (dkv[:, :, i].transpose(0, 2, 1, 3) for i in range(2))
    attention_backward(split_heads(dy, n_head), att_cache, split_heads(dq, n_head), dk, dv, ws,
                       name)
    d_enc = linear_backward(dkv.reshape(b, s, 2 * c), kv_cache, dw_kv, db_kv, ws, name + ".kv",
                            accumulate=accumulate)
    dx = layernorm_linear_backward(dq, q_cache, d_ln_w, d_ln_b, dw_q, db_q, ws, name + ".q",
                                   accumulate=accumulate)
    return dx, d_enc


def mlp_forward(x, ln_w, ln_b, w_fc, b_fc, w_proj, b_proj, *, out=None,
                ws: Optional[Workspace] = None, name: str = "mlp"):
    """proj(GELU(LN(x) W_fc)), the LayerNorm fused into the first linear."""
    ws = scratch(ws, array_module(x))
    b, t, c = x.shape
    f, fc_cache = layernorm_linear_forward(x, ln_w, ln_b, w_fc, b_fc,
                                           out=ws.get("tmp.fc.out", (b * t, w_fc.shape[0]),
                                                      x.dtype),
                                           ws=ws, name=name + ".fc")
    g, gelu_cache = gelu_forward(f, ws, name + ".gelu")
    m, proj_cache = linear_forward(g, w_proj, b_proj, ws, name + ".proj", out)
    return m.reshape(x.shape), (fc_cache, gelu_cache, proj_cache)


def mlp_backward(dout, cache, d_ln_w, d_ln_b, dw_fc, db_fc, dw_proj, db_proj, *, ws: Workspace,
                 name: str, accumulate: bool = False):
    fc_cache, gelu_cache, proj_cache = cache
    dg = linear_backward(dout, proj_cache, dw_proj, db_proj, ws, name + ".proj",
                         accumulate=accumulate)
    df = gelu_backward(dg, gelu_cache, ws, name + ".gelu")
    return layernorm_linear_backward(df, fc_cache, d_ln_w, d_ln_b, dw_fc, db_fc, ws, name + ".fc",
                                     accumulate=accumulate).reshape(dout.shape)


# -- blocks ------------------------------------------------------------------------------

def _add_branch(x, branch, mask) -> None:
    if mask is not None:
        branch *= mask
    x += branch


def encoder_block_forward(x, P: dict, p: str, n_head: int, *, key_bias=None,
                          drop: Optional[Dropout] = None, site: int = 0,
                          full_length: Optional[int] = None, ws: Workspace,
                          names: Optional[str] = None, keep_probs: bool = True):
    """x += attn(LN1 x); x += mlp(LN2 x), in place on the residual stream x (B, T, C).

    Dropout sites used: site (attention probabilities), site+1, site+2 (branches).
    full_length: the unpadded size T_max attention-probability masks are drawn at.
    names: prefix of the activations' workspace names (default p; recomputation shares
    one set between blocks). keep_probs: see ``attention.attention_forward``.
    """
    names = p if names is None else names
    b, t, c = x.shape
    drop = drop or Dropout(ws.xp, None, 0.0, x.dtype)
    tf = full_length or t
    att_mask = drop.mask(site, (n_head, t, t), (n_head, tf, tf))
    attn_mask, mlp_mask = drop.mask(site + 1, (t, c)), drop.mask(site + 2, (t, c))
    branch = ws.get("tmp.branch", (b * t, c), x.dtype)   # added to x at once: shared scratch
    a, attn = self_attention_forward(x, P[p + "ln1.w"], P.get(p + "ln1.b"), P[p + "attn.qkv.w"],
                                     P.get(p + "attn.qkv.b"), P[p + "attn.proj.w"],
                                     P.get(p + "attn.proj.b"), n_head, causal=False,
                                     key_bias=key_bias, attn_dropout=att_mask, out=branch,
                                     ws=ws, name=names + "attn", keep_probs=keep_probs)
    _add_branch(x, a, attn_mask)
    m, mlp = mlp_forward(x, P[p + "ln2.w"], P.get(p + "ln2.b"), P[p + "mlp.fc.w"],
                         P.get(p + "mlp.fc.b"), P[p + "mlp.proj.w"], P.get(p + "mlp.proj.b"),
                         out=branch, ws=ws, name=names + "mlp")
    _add_branch(x, m, mlp_mask)
    return attn, attn_mask, mlp, mlp_mask


def encoder_block_backward(dx, cache, G: dict, p: str, *, ws: Workspace) -> None:
    """dx (the residual-stream gradient) is updated in place; G's block tensors overwritten."""
    attn, attn_mask, mlp, mlp_mask = cache
    dx += mlp_backward(masked(dx, mlp_mask, ws), mlp, G[p + "ln2.w"], G.get(p + "ln2.b"),
                       G[p + "mlp.fc.w"], G.get(p + "mlp.fc.b"), G[p + "mlp.proj.w"],
                       G.get(p + "mlp.proj.b"), ws=ws, name="bwd.mlp")
    dx += self_attention_backward(masked(dx, attn_mask, ws), attn, G[p + "ln1.w"],
                                  G.get(p + "ln1.b"), G[p + "attn.qkv.w"],
                                  G.get(p + "attn.qkv.b"), G[p + "attn.proj.w"],
                                  G.get(p + "attn.proj.b"), ws=ws, name="bwd.attn")


def decoder_block_forward(x, enc, P: dict, p: str, n_head: int, *, enc_bias=None,
                          drop: Optional[Dropout] = None, site: int = 0,
                          full_lengths: Optional[tuple] = None, ws: Workspace,
                          names: Optional[str] = None, keep_probs: bool = True):
    """x += causal_attn(LN1 x); x += cross_attn(LN2 x, enc); x += mlp(LN3 x), in place.

    Dropout sites: site .. site+4. full_lengths (T_max, S_max): the unpadded sizes
    attention-probability masks are drawn at (see ``Dropout``). names, keep_probs: as
    ``encoder_block_forward``.
    """
    names = p if names is None else names
    b, t, c = x.shape
    s = enc.shape[1]
    drop = drop or Dropout(ws.xp, None, 0.0, x.dtype)
    tf, sf = full_lengths or (t, s)
    self_att = drop.mask(site, (n_head, t, t), (n_head, tf, tf))
    cross_att = drop.mask(site + 2, (n_head, t, s), (n_head, tf, sf))
    masks = [drop.mask(site + k, (t, c)) for k in (1, 3, 4)]
    branch = ws.get("tmp.branch", (b * t, c), x.dtype)
    a, attn = self_attention_forward(x, P[p + "ln1.w"], P.get(p + "ln1.b"), P[p + "attn.qkv.w"],
                                     P.get(p + "attn.qkv.b"), P[p + "attn.proj.w"],
                                     P.get(p + "attn.proj.b"), n_head, causal=True,
                                     attn_dropout=self_att, out=branch, ws=ws, name=names + "attn",
                                     keep_probs=keep_probs)
    _add_branch(x, a, masks[0])
    ca, cross = cross_attention_forward(x, enc, P[p + "ln2.w"], P.get(p + "ln2.b"),
                                        P[p + "cross.q.w"], P.get(p + "cross.q.b"),
                                        P[p + "cross.kv.w"], P.get(p + "cross.kv.b"),
                                        P[p + "cross.proj.w"], P.get(p + "cross.proj.b"), n_head,
                                        key_bias=enc_bias, attn_dropout=cross_att, out=branch,
                                        ws=ws, name=names + "cross", keep_probs=keep_probs)
    _add_branch(x, ca, masks[1])
    m, mlp = mlp_forward(x, P[p + "ln3.w"], P.get(p + "ln3.b"), P[p + "mlp.fc.w"],
                         P.get(p + "mlp.fc.b"), P[p + "mlp.proj.w"], P.get(p + "mlp.proj.b"),
                         out=branch, ws=ws, name=names + "mlp")
    _add_branch(x, m, masks[2])
    return attn, cross, mlp, masks


def decoder_block_backward(dx, d_enc, cache, G: dict, p: str, *, ws: Workspace) -> None:
    """dx updated in place; the encoder-output gradient is ADDED to d_enc (every decoder
    block reads the same encoder output)."""
    attn, cross, mlp, (attn_mask, cross_mask, mlp_mask) = cache
    dx += mlp_backward(masked(dx, mlp_mask, ws), mlp, G[p + "ln3.w"], G.get(p + "ln3.b"),
                       G[p + "mlp.fc.w"], G.get(p + "mlp.fc.b"), G[p + "mlp.proj.w"],
                       G.get(p + "mlp.proj.b"), ws=ws, name="bwd.mlp")
    dxc, dec = cross_attention_backward(masked(dx, cross_mask, ws), cross, G[p + "ln2.w"],
                                        G.get(p + "ln2.b"), G[p + "cross.q.w"],
                                        G.get(p + "cross.q.b"), G[p + "cross.kv.w"],
                                        G.get(p + "cross.kv.b"), G[p + "cross.proj.w"],
                                        G.get(p + "cross.proj.b"), ws=ws, name="bwd.cross")
    dx += dxc
    d_enc += dec
    dx += self_attention_backward(masked(dx, attn_mask, ws), attn, G[p + "ln1.w"],
                                  G.get(p + "ln1.b"), G[p + "attn.qkv.w"],
                                  G.get(p + "attn.qkv.b"), G[p + "attn.proj.w"],
                                  G.get(p + "attn.proj.b"), ws=ws, name="bwd.attn")


# -- incremental decoding (forward only) -------------------------------------------------

def cross_keys_values(enc, P: dict, p: str, n_head: int):
    """The cross-attention keys and values of block ``p`` for encoder output enc (N, S, C):
    computed once per source, reused by every decoding step."""
    n, s, c = enc.shape
    kv, _ = linear_forward(enc, P[p + "cross.kv.w"], P.get(p + "cross.kv.b"))
    kvh = kv.reshape(n, s, 2, n_head, c // n_head)
    return kvh[:, :, 0].transpose(0, 2, 1, 3), kvh[:, :, 1].transpose(0, 2, 1, 3)


def decoder_block_step(x, P: dict, p: str, n_head: int, pos: int, self_kv: tuple, cross_kv: tuple,
                       enc_bias=None):
    """Block ``p`` on the newest position only: x (N, 1, C) at position ``pos``.

    self_kv: (K, V) arrays (N, H, T_max, hs); this position's key / value are stored
    at index pos and the query attends to 0..pos (the causal mask, implicitly).
    Returns the block output (N, 1, C); the same arithmetic as ``decoder_block_forward``.
    """
    n, _, c = x.shape
    hs = c // n_head
    scale = 1.0 / math.sqrt(hs)
    x = x.copy()
    qkv, _ = layernorm_linear_forward(x, P[p + "ln1.w"], P.get(p + "ln1.b"), P[p + "attn.qkv.w"],
                                      P.get(p + "attn.qkv.b"))
    heads = qkv.reshape(n, 1, 3, n_head, hs)
    q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    self_kv[0][:, :, pos:pos + 1] = k
    self_kv[1][:, :, pos:pos + 1] = v
    y, _ = attention_forward(q, self_kv[0][:, :, :pos + 1], self_kv[1][:, :, :pos + 1],
                             causal=False, scale=scale)
    a, _ = linear_forward(y.transpose(0, 2, 1, 3).reshape(n, 1, c), P[p + "attn.proj.w"],
                          P.get(p + "attn.proj.b"))
    x += a
    q, _ = layernorm_linear_forward(x, P[p + "ln2.w"], P.get(p + "ln2.b"), P[p + "cross.q.w"],
                                    P.get(p + "cross.q.b"))
    y, _ = attention_forward(split_heads(q.reshape(n, 1, c), n_head), cross_kv[0], cross_kv[1],
                             causal=False, attn_bias=enc_bias)
    a, _ = linear_forward(y.transpose(0, 2, 1, 3).reshape(n, 1, c), P[p + "cross.proj.w"],
                          P.get(p + "cross.proj.b"))
    x += a
    m, _ = mlp_forward(x, P[p + "ln3.w"], P.get(p + "ln3.b"), P[p + "mlp.fc.w"],
                       P.get(p + "mlp.fc.b"), P[p + "mlp.proj.w"], P.get(p + "mlp.proj.b"))
    x += m
    return x

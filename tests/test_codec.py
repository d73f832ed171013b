"""Push encodings (hpcps/ps/codec.py): exact fp32 round trips with sparse rows cut at
odd shard boundaries, fp16/bf16 error bounds and rounding, top-k selection, error
feedback bookkeeping, and byte counts of sparse-row pushes."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcps.model.layout import ParamLayout
from hpcps.ps.codec import ErrorFeedback, ShardCodec, from_bf16, to_bf16, to_fp16
from hpcps.ps.sharding import shard_ranges

pytestmark = pytest.mark.timeout(60)


def model_layout() -> ParamLayout:
    """Dense and sparse-row tensors interleaved, with row lengths that do not divide shards."""
    layout = ParamLayout()
    layout.add("a", (5,))
    layout.add("emb", (11, 3), std=0.02, sparse_rows=True)
    layout.add("b", (4, 7), std=0.02)
    layout.add("emb2", (6, 4), std=0.02, sparse_rows=True)
    layout.add("c", (3,))
    return layout  # 93 elements


def sparse_gradient(layout, rng, touched):
    """Random dense gradient whose sparse tensors are nonzero only on the touched rows."""
    grad = rng.standard_normal(layout.total).astype(np.float32)
    for name, rows in touched.items():
        spec = layout[name]
        view = grad[spec.offset:spec.end].reshape(spec.shape)
        keep = np.zeros(spec.shape[0], dtype=bool)
        keep[rows] = True
        view[~keep] = 0.0
    return grad


def expected_bytes(layout, lo, hi, touched, width=4) -> int:
    """Payload size computed from first principles: dense elements, and for each sparse
    segment a row count, the row ids and the touched rows' elements inside the shard."""
    total = 0
    for spec, a, b in layout.overlapping(lo, hi):
        if not spec.sparse_rows:
            total += (b - a) * width
            continue
        row_len = spec.shape[1]
        rows = [r for r in touched[spec.name]
                if spec.offset + r * row_len < b and spec.offset + (r + 1) * row_len > a]
        elems = sum(min(b, spec.offset + (r + 1) * row_len) - max(a, spec.offset + r * row_len)
                    for r in rows)
        total += 4 + 4 * len(rows) + elems * width
    return total


@settings(max_examples=150, deadline=None)
@given(servers=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       emb_rows=st.sets(st.integers(0, 10), max_size=11),
       emb2_rows=st.sets(st.integers(0, 5), max_size=6))
def test_none_round_trip_is_exact_with_sparse_rows(servers, seed, emb_rows, emb2_rows):
    layout = model_layout()
    rng = np.random.default_rng(seed)
    touched = {"emb": np.array(sorted(emb_rows), dtype=np.int64),
               "emb2": np.array(sorted(emb2_rows), dtype=np.int64)}
    grad = sparse_gradient(layout, rng, touched)
    for lo, hi in shard_ranges(layout.total, servers):
        codec = ShardCodec(layout, lo, hi, "none")
        out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
        nbytes = codec.encode(grad[lo:hi], out, touched)
        # only the touched rows travel, and never more than the slot can hold
        assert nbytes == expected_bytes(layout, lo, hi, touched)
        assert nbytes <= codec.max_payload_bytes
        acc = np.zeros(hi - lo, dtype=np.float32)
        codec.decode_add(out[:nbytes], acc)
        np.testing.assert_array_equal(acc, grad[lo:hi])
        # no row list (touched=None): every row is sent, still exact
        nbytes = codec.encode(grad[lo:hi], out, None)
        acc[:] = 1.0
        codec.decode_add(out[:nbytes], acc, weight=0.5)
        np.testing.assert_allclose(acc, 1.0 + 0.5 * grad[lo:hi], rtol=1e-6, atol=1e-7)


def test_sparse_push_is_smaller_than_dense():
    layout = ParamLayout()
    layout.add("wte", (1000, 16), sparse_rows=True)
    layout.add("w", (16, 16))
    codec = ShardCodec(layout, 0, layout.total, "none")
    touched = {"wte": np.array([3, 500, 999])}
    grad = sparse_gradient(layout, np.random.default_rng(0), touched)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    assert codec.encode(grad, out, touched) == 4 + 3 * 4 + 3 * 16 * 4 + 256 * 4
    assert codec.encode(grad, out, None) == 4 + layout.total * 4
    # negative control: with sparse rows disabled the whole table always travels
    dense = ShardCodec(layout, 0, layout.total, "none", sparse_rows=False)
    assert dense.is_plain_dense and dense.encode(grad, out, touched) == layout.total * 4


# -- fp16 / bf16 -----------------------------------------------------------------------------
def magnitudes(seed: int, n: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.exp(rng.uniform(math.log(1e-4), math.log(6e4), n)) * rng.choice([-1.0, 1.0], n)
    return x.astype(np.float32)


@pytest.mark.parametrize("compression,unit", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_half_precision_relative_error_bound(compression, unit):
    layout = ParamLayout()
    layout.add("w", (20000,))
    codec = ShardCodec(layout, 0, 20000, compression)
    x = magnitudes(1)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    nbytes = codec.encode(x, out)
    assert nbytes == 2 * x.size
    y = np.zeros_like(x)
    codec.decode_add(out[:nbytes], y)
    rel = np.abs(y - x) / np.abs(x)
    assert rel.max() <= unit           # round to nearest: half an ulp
    assert rel.max() > unit / 4         # and it is a half-precision code, not fp32


def test_bf16_rounds_to_nearest_even():
    one = 1.0
    cases = {one + 2 ** -9: one,                    # below half an ulp: down
             one + 2 ** -8: one,                    # a tie: to the even mantissa (down)
             one + 3 * 2 ** -8: one + 2 ** -6,      # a tie: to the even mantissa (up)
             one + 2 ** -8 + 2 ** -20: one + 2 ** -7,  # above the tie: up
             -3.0: -3.0}
    x = np.array(list(cases), dtype=np.float32)
    np.testing.assert_array_equal(from_bf16(to_bf16(x)), np.array(list(cases.values()),
                                                                    dtype=np.float32))


def test_fp16_clamps_instead_of_overflowing():
    y = to_fp16(np.array([1e6, -1e6, 70000.0], dtype=np.float32)).astype(np.float32)
    np.testing.assert_array_equal(y, [65504.0, -65504.0, 65504.0])


# -- top-k -----------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 400), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 2**32 - 1))
def test_topk_keeps_exactly_the_k_largest(n, ratio, seed):
    layout = ParamLayout()
    layout.add("w", (n,))
    codec = ShardCodec(layout, 0, n, "topk", topk_ratio=ratio)
    k = max(1, math.ceil(ratio * n))
    assert codec.k == k and codec.max_payload_bytes == 8 * k
    rng = np.random.default_rng(seed)
    # distinct magnitudes so "the k largest" is one set
    x = (rng.permutation(n) + 1).astype(np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    assert codec.encode(x, out) == 8 * k
    y = np.zeros(n, dtype=np.float32)
    codec.decode_add(out, y)
    kept = np.nonzero(y)[0]
    assert len(kept) == min(k, n)
    assert set(kept) == set(np.argsort(-np.abs(x))[:k])
    np.testing.assert_array_equal(y[kept], x[kept])


# -- error feedback --------------------------------------------------------------------------
@pytest.mark.parametrize("compression,ratio", [("topk", 0.05), ("topk", 0.3), ("bf16", 1.0),
                                               ("fp16", 1.0)])
def test_error_feedback_tracks_the_true_sum(compression, ratio):
    """Σ sent − Σ true == −residual at every step, and the residual stays bounded."""
    n, steps = 500, 300
    layout = ParamLayout()
    layout.add("w", (n,))
    codec = ShardCodec(layout, 0, n, compression, topk_ratio=ratio)
    fb = ErrorFeedback(codec)
    rng = np.random.default_rng(3)
    sent = np.zeros(n, dtype=np.float64)
    true = np.zeros(n, dtype=np.float64)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    worst = 0.0
    for _ in range(steps):
        g = (rng.standard_normal(n) + 0.3).astype(np.float32)  # a bias: sums keep growing
        nbytes = fb.encode(g, out)
        decoded = np.zeros(n, dtype=np.float32)
        codec.decode_add(out[:nbytes], decoded)
        sent += decoded
        true += g
        np.testing.assert_allclose(true - sent, fb.residual, atol=1e-3 * steps ** 0.5)
        worst = max(worst, float(np.abs(fb.residual).max()))
    # bounded: far below what dropping everything unsent would accumulate (~0.3 * steps)
    # (half an ulp of |g + residual| < 6 for the half formats; a few gradients for top-k)
    limit = {"fp16": 6 * 2.0 ** -11, "bf16": 6 * 2.0 ** -8}.get(compression,
                                                               12.0 if ratio < 0.1 else 4.0)
    assert worst < limit, worst
    assert np.abs(true).max() > 50  # the sums themselves did grow


def test_without_error_feedback_topk_drifts():
    # negative control for the test above: plain top-k loses mass that never comes back
    n, steps = 500, 300
    layout = ParamLayout()
    layout.add("w", (n,))
    codec = ShardCodec(layout, 0, n, "topk", topk_ratio=0.05)
    rng = np.random.default_rng(3)
    sent = np.zeros(n)
    true = np.zeros(n)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    for _ in range(steps):
        g = (rng.standard_normal(n) + 0.3).astype(np.float32)
        decoded = np.zeros(n, dtype=np.float32)
        codec.decode_add(out[:codec.encode(g, out)], decoded)
        sent += decoded
        true += g
    assert np.abs(true - sent).max() > 50

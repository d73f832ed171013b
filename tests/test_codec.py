"""Push encodings (hpcps/ps/codec.py): exact fp32 round trips with sparse rows cut at
odd shard boundaries, fp16/bf16 error bounds and rounding, top-k selection, error
feedback bookkeeping, byte counts of sparse-row pushes, and int4 blocks (hand-computed
payload, half-a-step bound, zero and non-finite blocks, sizes, error feedback)."""

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


# -- int4 ------------------------------------------------------------------------------------
def int4_codec(n: int) -> ShardCodec:
    layout = ParamLayout()
    layout.add("w", (n,))
    return ShardCodec(layout, 0, n, "int4")


def int4_round_trip(x: np.ndarray, weight: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """(decoded values, payload bytes, payload size) of one int4 push of ``x``."""
    codec = int4_codec(x.size)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    nbytes = codec.encode(x, out)
    acc = np.zeros(x.size, dtype=np.float32)
    codec.decode_add(out[:nbytes], acc, weight)
    return acc, out, nbytes


def test_int4_exact_payload_and_values():
    # block 0 (64 elements): absmax 7 -> scale 1; block 1 (3 elements): absmax 14 -> scale 2
    x = np.zeros(67, dtype=np.float32)
    x[:5] = [3.5, -7.0, 1.0, 0.25, -2.0]   # codes 4 (a tie: to even), -7, 1, 0, -2
    x[64:] = [14.0, -3.0, 5.0]             # codes 7, -2 (a tie: to even), 2 (a tie: to even)
    decoded, out, nbytes = int4_round_trip(x)
    assert nbytes == 4 * 2 + 34
    np.testing.assert_array_equal(out[:8].view(np.float32), [1.0, 2.0])
    codes = np.zeros(34, dtype=np.uint8)
    codes[:3] = [0x94, 0x01, 0x0E]   # (4 | -7 << 4), (1 | 0 << 4), (-2 | 0 << 4)
    codes[32:] = [0xE7, 0x02]        # (7 | -2 << 4), (2 | padding 0 << 4)
    np.testing.assert_array_equal(out[8:nbytes], codes)
    expected = np.zeros(67, dtype=np.float32)
    expected[:5] = [4.0, -7.0, 1.0, 0.0, -2.0]
    expected[64:] = [14.0, -4.0, 4.0]
    np.testing.assert_array_equal(decoded, expected)
    # decode_add adds weight x decoded into what the accumulator holds
    codec = int4_codec(67)
    acc = np.full(67, 1.0, dtype=np.float32)
    codec.decode_add(out[:nbytes], acc, 0.5)
    np.testing.assert_array_equal(acc, 1.0 + 0.5 * expected)


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 1000, 65536, 65537, 3 * 65536 + 33])
def test_int4_payload_size(n):
    codec = int4_codec(n)
    expected = 4 * math.ceil(n / 64) + math.ceil(n / 2)
    assert codec.max_payload_bytes == expected
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = np.zeros(expected + 16, dtype=np.uint8)   # the slack must stay untouched
    assert codec.encode(x, out) == expected
    assert not out[expected:].any()


def test_int4_payload_ratio_vs_fp32():
    n = 1 << 20
    assert int4_codec(n).max_payload_bytes == n // 16 + n // 2
    assert 7.1 < 4 * n / int4_codec(n).max_payload_bytes < 7.12


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_int4_round_trip_error_at_most_half_a_step(n, seed):
    rng = np.random.default_rng(seed)
    # magnitudes that differ a lot from block to block
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n // 64 + 1)).repeat(64)[:n])
    x = x.astype(np.float32)
    decoded, out, _ = int4_round_trip(x)
    blocks = math.ceil(n / 64)
    scale = out[:4 * blocks].view(np.float32)
    padded = np.zeros(blocks * 64, dtype=np.float32)
    padded[:n] = np.abs(x)
    np.testing.assert_array_equal(scale, padded.reshape(-1, 64).max(axis=1) / np.float32(7))
    step = scale.repeat(64)[:n]
    err = np.abs(decoded.astype(np.float64) - x)
    assert (err <= step / 2 * (1 + 1e-6)).all()
    codes = decoded / np.where(step > 0, step, 1)
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-5)   # whole steps ...
    assert np.abs(codes).max() <= 7 + 1e-5                          # ... within -7..7


def test_int4_is_a_coarse_code():
    # negative control for the bound above: a 4-bit code really loses up to half a step
    x = np.random.default_rng(0).standard_normal(64 * 100).astype(np.float32)
    decoded, out, _ = int4_round_trip(x)
    step = out[:400].view(np.float32).repeat(64)
    assert (np.abs(decoded - x) / step).max() > 0.45


def test_int4_zero_blocks_decode_to_zero_without_nan():
    x = np.zeros(64 * 3 + 5, dtype=np.float32)
    x[64:128] = np.linspace(-1, 1, 64)   # only block 1 is nonzero
    with np.errstate(all="raise"):       # no 0/0 anywhere
        decoded, out, _ = int4_round_trip(x)
    np.testing.assert_array_equal(out[:16].view(np.float32), [0.0, 1 / np.float32(7), 0.0, 0.0])
    assert np.isfinite(decoded).all()
    assert not decoded[:64].any() and not decoded[128:].any()
    assert np.abs(decoded[64:128] - x[64:128]).max() <= 0.5 / 7 + 1e-7


def test_int4_non_finite_value_poisons_its_block_only():
    x = np.ones(128, dtype=np.float32)
    x[70] = np.inf
    decoded, _, _ = int4_round_trip(x)
    assert np.isfinite(decoded[:64]).all()
    assert not np.isfinite(decoded[64:]).any()   # the server's checks see the block


def test_int4_ignores_row_lists():
    # a fixed block grid over the whole shard: sparse rows travel densely, touched or not
    layout = model_layout()
    touched = {"emb": np.array([2, 7]), "emb2": np.array([1])}
    grad = sparse_gradient(layout, np.random.default_rng(5), touched)
    for lo, hi in shard_ranges(layout.total, 2):
        codec = ShardCodec(layout, lo, hi, "int4")
        assert not codec.has_sparse
        a = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
        b = np.zeros_like(a)
        assert codec.encode(grad[lo:hi], a, touched) == codec.encode(grad[lo:hi], b, None)
        np.testing.assert_array_equal(a, b)


def test_int4_large_shard_keeps_temporaries_small():
    import tracemalloc
    n = 4_000_003   # 16 MB of fp32, several passes and a short last one
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    codec = int4_codec(n)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    acc = np.zeros(n, dtype=np.float32)
    tracemalloc.start()
    try:
        codec.encode(x, out)
        codec.decode_add(out, acc, 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak          # a few passes' worth, not a shard's worth
    scale = out[:4 * codec.int4.blocks].view(np.float32).repeat(64)[:n]
    assert (np.abs(acc - x) <= scale / 2 * (1 + 1e-6)).all()


def int4_biased_pushes(feedback: bool, steps: int = 300):
    """Σ true and Σ decoded over ``steps`` pushes whose small values sit below half a step:
    each block holds one spike of 7 (scale ~1) and values around 0.3."""
    n = 64 * 8
    codec = int4_codec(n)
    fb = ErrorFeedback(codec) if feedback else None
    rng = np.random.default_rng(11)
    sent = np.zeros(n)
    true = np.zeros(n)
    out = np.zeros(codec.max_payload_bytes, dtype=np.uint8)
    last_step = None
    for _ in range(steps):
        g = (0.3 + 0.05 * rng.standard_normal(n)).astype(np.float32)
        g[::64] = 7.0
        nbytes = fb.encode(g, out) if fb else codec.encode(g, out)
        decoded = np.zeros(n, dtype=np.float32)
        codec.decode_add(out[:nbytes], decoded)
        sent += decoded
        true += g
        last_step = out[:4 * 8].view(np.float32).repeat(64)
    return true, sent, last_step, fb


def test_int4_error_feedback_sums_within_one_step():
    true, sent, last_step, fb = int4_biased_pushes(feedback=True)
    # what never arrived is the residual: at most half of the last push's step (+ fp32 sums)
    np.testing.assert_allclose(true - sent, fb.residual, atol=1e-3)
    assert (np.abs(true - sent) <= last_step / 2 + 1e-3).all()
    assert true.min() > 80   # the sums did grow


def test_int4_without_error_feedback_drifts():
    # negative control: the 0.3s round to 0 at every push and are lost for good
    true, sent, last_step, _ = int4_biased_pushes(feedback=False)
    assert np.abs(true - sent).max() > 80 * last_step.max()

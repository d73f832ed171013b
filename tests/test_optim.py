"""hpcps.optim: AdamW and SGD on slices of the flat buffer (hand-computed steps always,
torch.optim step by step when torch is installed), the lr schedule, and clipping."""

import math

import numpy as np
import pytest

from hpcps.config import load_config
from hpcps.optim import (
    SGD,
    AdamW,
    clip_coefficient,
    lr_at,
    make_optimizer,
    sum_of_squares,
)
from hpcps.optim.schedule import lr_schedule

pytestmark = pytest.mark.timeout(60)


def test_adamw_first_step_by_hand():
    p0 = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    g = np.array([0.1, -0.4, 0.0, 2.0], dtype=np.float32)
    lr, wd, eps, b1, b2 = 0.01, 0.1, 1e-8, 0.9, 0.95
    opt = AdamW(4, [(0, 2)], beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
    p = p0.copy()
    opt.step(p, g, lr)
    # t = 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps); decay on [0, 2) only
    expected = p0.astype(np.float64)
    expected[:2] *= 1 - lr * wd
    expected -= lr * g / (np.abs(g.astype(np.float64)) + eps)
    np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(opt.m, (1 - b1) * g, rtol=1e-6)
    np.testing.assert_allclose(opt.v, (1 - b2) * g.astype(np.float64) ** 2, rtol=1e-6)
    assert opt.t == 1


def test_adamw_grad_scale_is_a_scaled_gradient():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(50).astype(np.float32)
    a, b = AdamW(50, [(0, 50)], weight_decay=0.1), AdamW(50, [(0, 50)], weight_decay=0.1)
    pa = rng.standard_normal(50).astype(np.float32)
    pb = pa.copy()
    for step in range(3):
        a.step(pa, g, 1e-2, grad_scale=0.25)
        b.step(pb, g * np.float32(0.25), 1e-2)
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-7)


def test_sgd_momentum_and_decoupled_decay_by_hand():
    p = np.array([1.0, 2.0], dtype=np.float32)
    opt = SGD(2, [(1, 2)], momentum=0.9, weight_decay=0.5)
    g1 = np.array([1.0, 1.0], dtype=np.float32)
    g2 = np.array([-2.0, 0.5], dtype=np.float32)
    opt.step(p, g1, 0.1)
    # buf = g1; element 1 decays first: 2 * (1 - 0.05) = 1.9
    np.testing.assert_allclose(p, [1.0 - 0.1, 1.9 - 0.1], rtol=1e-6)
    opt.step(p, g2, 0.1, grad_scale=2.0)
    buf = 0.9 * g1 + 2.0 * g2
    np.testing.assert_allclose(opt.buf, buf, rtol=1e-6)
    np.testing.assert_allclose(p, [0.9 - 0.1 * buf[0], 1.8 * 0.95 - 0.1 * buf[1]], rtol=1e-6)


def test_sgd_without_momentum_is_plain_gradient_descent():
    p = np.zeros(3, dtype=np.float32)
    opt = SGD(3, [], momentum=0.0)
    for _ in range(4):
        opt.step(p, np.array([1, 2, 3], dtype=np.float32), 1.0)
    np.testing.assert_array_equal(p, [-4, -8, -12])


def test_make_optimizer_follows_the_config():
    cfg = load_config(None, ["train.optimizer=adamw", "train.beta1=0.8", "train.beta2=0.95",
                             "train.eps=1e-6", "train.weight_decay=0.2"])
    opt = make_optimizer(cfg, 10, [(0, 4)])
    assert isinstance(opt, AdamW)
    assert (opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (0.8, 0.95, 1e-6, 0.2)
    assert opt.decay_ranges == [(0, 4)]
    opt = make_optimizer(load_config(None, ["train.optimizer=sgd", "train.momentum=0.5"]), 10, [])
    assert isinstance(opt, SGD) and opt.momentum == 0.5


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((6, 20)).astype(np.float32)
    p = rng.standard_normal(20).astype(np.float32)
    a = AdamW(20, [(0, 20)], weight_decay=0.1)
    pa = p.copy()
    for g in grads[:3]:
        a.step(pa, g, 1e-2)
    b = AdamW(20, [(0, 20)], weight_decay=0.1)
    b.load_state({k: np.array(v, copy=True) if hasattr(v, "shape") else v
                  for k, v in a.state().items()})
    pb = pa.copy()
    for g in grads[3:]:
        a.step(pa, g, 1e-2)
        b.step(pb, g, 1e-2)
    np.testing.assert_array_equal(pa, pb)


# -- against torch ---------------------------------------------------------------------------
def test_adamw_matches_torch_step_by_step():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n, decay = 300, [(0, 120), (200, 260)]
    p0 = rng.standard_normal(n).astype(np.float32)
    cfg = load_config(None, [])
    lr_fn = lr_schedule(cfg.replace(train__warmup_steps=3, train__max_steps=12))
    ours = AdamW(n, decay, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    p = p0.copy()
    tp = torch.tensor(p0)
    masks = np.zeros(n, dtype=bool)
    for a, b in decay:
        masks[a:b] = True
    decayed = torch.nn.Parameter(tp[torch.from_numpy(masks)].clone())
    plain = torch.nn.Parameter(tp[torch.from_numpy(~masks)].clone())
    ref = torch.optim.AdamW([{"params": [decayed], "weight_decay": 0.1},
                             {"params": [plain], "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.99), eps=1e-8, foreach=False, fused=False)
    for step in range(12):
        g = (rng.standard_normal(n) * (1 + step)).astype(np.float32)
        lr = lr_fn(step)
        ours.step(p, g, lr)
        for group in ref.param_groups:
            group["lr"] = lr
        decayed.grad = torch.from_numpy(g[masks].copy())
        plain.grad = torch.from_numpy(g[~masks].copy())
        ref.step()
        np.testing.assert_allclose(p[masks], decayed.detach().numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(p[~masks], plain.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_sgd_momentum_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(64).astype(np.float32)
    ours = SGD(64, [], momentum=0.9)
    p = p0.copy()
    param = torch.nn.Parameter(torch.tensor(p0))
    ref = torch.optim.SGD([param], lr=0.05, momentum=0.9)
    for _ in range(8):
        g = rng.standard_normal(64).astype(np.float32)
        ours.step(p, g, 0.05)
        param.grad = torch.from_numpy(g)
        ref.step()
    np.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_clip_matches_torch_clip_grad_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    pieces = [rng.standard_normal(k).astype(np.float32) * 3 for k in (7, 30, 101)]
    sumsq = sum(sum_of_squares(x) for x in pieces)   # shards add their parts
    norm, scale = clip_coefficient(sumsq, 1.0)
    params = [torch.nn.Parameter(torch.zeros(len(x))) for x in pieces]
    for prm, x in zip(params, pieces):
        prm.grad = torch.from_numpy(x.copy())
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert math.isclose(norm, float(total), rel_tol=1e-6)
    for prm, x in zip(params, pieces):
        np.testing.assert_allclose(prm.grad.numpy(), x * scale, rtol=1e-6)


# -- schedule and clip semantics (always) ----------------------------------------------------
def test_schedule_warmup_peak_and_end():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=100)
    assert lr_at(0, **kw) == pytest.approx(1 / 11)
    assert lr_at(9, **kw) == pytest.approx(10 / 11)
    assert lr_at(10, **kw) == pytest.approx(1.0)           # peak right after warm-up
    assert lr_at(55, **kw) == pytest.approx(0.55)          # half-way down the cosine
    assert lr_at(100, **kw) == pytest.approx(0.1)          # reaches min_lr at decay_steps
    assert lr_at(5000, **kw) == 0.1
    values = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, decay_steps=100) == 1.0


def test_schedule_from_config_uses_max_steps_when_decay_is_zero():
    cfg = load_config(None, ["train.lr=2e-3", "train.min_lr=2e-4", "train.warmup_steps=5",
                             "train.max_steps=50", "train.lr_decay_steps=0"])
    fn = lr_schedule(cfg)
    assert fn(5) == pytest.approx(2e-3) and fn(50) == pytest.approx(2e-4)


def test_clip_semantics():
    norm, scale = clip_coefficient(25.0, 1.0)
    assert norm == 5.0 and scale == pytest.approx(1.0 / (5.0 + 1e-6))
    assert clip_coefficient(0.25, 1.0) == (0.5, 1.0)        # below the threshold: untouched
    assert clip_coefficient(25.0, 0.0) == (5.0, 1.0)         # 0 turns clipping off
    assert clip_coefficient(0.0, 1.0) == (0.0, 1.0)


def test_adamw_in_chunks_is_bit_identical_to_one_pass():
    """A server updates its shard in chunks with MPI progress between them: the chunks must
    not change a single bit (every operation is elementwise)."""
    from hpcps.optim import adamw
    n = 3 * adamw.CHUNK + 5
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(n).astype(np.float32)
    decay = [(7, adamw.CHUNK + 3), (2 * adamw.CHUNK - 1, n - 2)]   # ranges across chunk edges
    chunked, one_pass = AdamW(n, decay, weight_decay=0.1), AdamW(n, decay, weight_decay=0.1)
    pc, pr = p0.copy(), p0.copy()
    calls = []
    for step in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        chunked.step(pc, g, 1e-2, grad_scale=0.5, between=lambda: calls.append(1))
        _whole_buffer_adamw(one_pass, pr, g, 1e-2, 0.5)
    assert np.array_equal(pc, pr) and np.array_equal(chunked.m, one_pass.m)
    assert len(calls) == 3 * 4   # ceil(n / CHUNK) pieces per step
    pr[n // 2] = np.nextafter(pr[n // 2], np.float32(np.inf))   # negative control: one ulp
    assert not np.array_equal(pc, pr)


def _whole_buffer_adamw(opt, params, grad, lr, scale):
    """The update as one pass over the whole buffer (the reference for the chunked one)."""
    opt.t += 1
    for a, b in opt.decay_ranges:
        params[a:b] *= np.float32(1.0 - lr * opt.weight_decay)
    AdamW._update_range(opt, params, grad, opt.m, opt.v, opt._tmp, lr, scale)

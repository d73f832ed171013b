"""The GPU path, tested on every machine: one test body per check, run with NumPy
always and with CuPy when a GPU is visible (skipped cleanly otherwise).

- parity: every layer, the whole model and AdamW against NumPy (float64 and fp32);
  the fused kernels (or, on NumPy, the layers' own code) against their references;
- cuBLAS planning: row-major operands -> one strided-batched call, checked against
  an emulation of cuBLAS's column-major semantics (CPU) and against cupy.matmul (GPU);
- transport: staged gradient ranges reach MPI only after their copy completed,
  with a fake CUDA that completes copies late;
- bad input: device = gpu without CuPy / without a GPU / with more workers than
  GPUs exits 2 with one line on every rank.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from mpi_util import describe, mpi_env, mpich_mpirun, run_command

from hpcps.backend import cupy_available, get_backend, gpu_slot
from hpcps.bench import gpu_parity as parity
from hpcps.errors import UserError
from hpcps.gpu import kernels, precision, transport

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["numpy", "cupy"]


@pytest.fixture(params=BACKENDS)
def xp(request):
    if request.param == "numpy":
        return np
    if not cupy_available():
        pytest.skip("CuPy with a visible GPU is not available")
    import cupy
    return cupy


TOLERANCE = {np.float64: parity.FP64_REL, np.float32: parity.FP32_REL}


def _over(errors: dict, tol: float) -> dict:
    return {k: v for k, v in errors.items() if not v <= tol}


# -- parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
def test_every_layer_matches_numpy(xp, dtype):
    errors = parity.layer_parity(xp, dtype)
    assert set(errors) == set(parity.LAYER_CASES)
    assert _over(errors, TOLERANCE[dtype]) == {}, errors


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
def test_whole_model_gradient_matches_numpy(xp, dtype):
    assert parity.model_parity(xp, dtype) <= TOLERANCE[dtype]


def test_adamw_matches_numpy(xp):
    assert parity.adamw_parity(xp) <= 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["fp64", "fp32"])
def test_fused_ops_match_their_references(xp, dtype):
    errors = parity.kernel_parity(xp, dtype)
    assert set(errors) == {"gelu", "layernorm", "softmax_causal", "softmax_full",
                           "softmax_backward", "cross_entropy"}
    assert _over(errors, TOLERANCE[dtype]) == {}, errors


def test_adamw_reference_is_the_optimizer():
    from hpcps.optim.adamw import AdamW
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(50), rng.standard_normal(50)
    opt = AdamW(50, [(10, 30)], beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.2)
    ours = p.astype(np.float32)
    opt.step(ours, g.astype(np.float32), 0.05, grad_scale=0.5)
    decay = np.zeros(50, dtype=bool)
    decay[10:30] = True
    ref, m, v = kernels.adamw_reference(p, g, np.zeros(50), np.zeros(50), decay, lr=0.05,
                                        beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.2, t=1,
                                        grad_scale=0.5)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.m, m, rtol=1e-5, atol=1e-7)


def test_parity_negative_control_catches_a_wrong_reference(monkeypatch):
    """A GELU derivative without its cubic term must fail the comparison by far."""
    def wrong(x):
        y, _ = real(x)
        th = np.tanh(kernels.GELU_K * (x + kernels.GELU_A * x ** 3))
        return y, 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * kernels.GELU_K
    real = kernels.gelu_reference
    monkeypatch.setattr(kernels, "gelu_reference", wrong)
    assert parity.kernel_parity(np, np.float64)["gelu"] > 1e-2


def test_rel_error_is_relative_to_the_reference():
    ref = np.array([1.0, -4.0, 2.0])
    assert parity.rel_error(ref, ref) == 0.0
    assert parity.rel_error(ref + [0, 0, 4e-5], ref) == pytest.approx(1e-5)
    assert parity.rel_error(ref[:2], ref) == float("inf")


# -- cuBLAS planning ------------------------------------------------------------------

def _element_strides(a) -> tuple:
    return tuple(s // a.itemsize for s in a.strides)


def _offset(view, base) -> int:
    return (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 8


def _layouts():
    """(name, a, a's base, b, b's base, out, out's base): the shapes the model uses."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    at, bt = rng.standard_normal((7, 5)), rng.standard_normal((3, 7))
    q4, k4 = rng.standard_normal((2, 4, 6, 8)), rng.standard_normal((2, 4, 6, 8))
    w = rng.standard_normal((8, 5))
    sub = rng.standard_normal((10, 12))
    col = rng.standard_normal((7, 1))

    def fresh(shape):
        base = np.zeros(int(np.prod(shape)) + 9)
        return base[4:4 + int(np.prod(shape))].reshape(shape), base
    cases = [("plain", a, a, b, b), ("a_transposed", at.T, at, b, b), ("b_transposed", a, a, bt.T, bt),
             ("batched_scores", q4, q4, k4.swapaxes(-1, -2), k4), ("batch_times_matrix", q4, q4, w, w),
             ("sub_views", sub[2:7, 1:8], sub, sub[1:8, 3:6], sub), ("vector_column", a, a, col, col)]
    for name, x, xb, y, yb in cases:
        out, ob = fresh(np.matmul(x, y).shape)
        yield name, x, xb, y, yb, out, ob


@pytest.mark.parametrize("layout", list(_layouts()), ids=lambda c: c[0])
def test_gemm_plan_reproduces_matmul_under_cublas_semantics(layout):
    _, a, abase, b, bbase, out, obase = layout
    plan = precision.plan_gemm(a.shape, _element_strides(a), b.shape, _element_strides(b),
                               out.shape, _element_strides(out))
    assert plan is not None
    precision.emulate_gemm(plan, abase.reshape(-1), _offset(a, abase), bbase.reshape(-1),
                           _offset(b, bbase), obase.reshape(-1), _offset(out, obase))
    np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-12, atol=1e-12)


def test_gemm_plan_negative_control_wrong_transpose_flag():
    rng = np.random.default_rng(1)
    at, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 4))
    a = at.T
    out = np.zeros((6, 4))
    plan = precision.plan_gemm(a.shape, _element_strides(a), b.shape, _element_strides(b),
                               out.shape, _element_strides(out))
    wrong = precision.GemmPlan(**{**plan.__dict__, "a": precision.Operand(0, plan.a.ld, 0)})
    precision.emulate_gemm(wrong, at.reshape(-1), 0, b.reshape(-1), 0, out.reshape(-1), 0)
    assert np.abs(out - a @ b).max() > 1e-3


def test_gemm_plan_declines_what_cublas_cannot_address():
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 6, 3, 4, 8))   # heads sliced out of a fused projection
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)
    assert precision.plan_gemm(q.shape, _element_strides(q), (8, 6), (6, 1), (2, 4, 6, 6),
                               (144, 36, 6, 1)) is None
    neg = np.arange(12.0).reshape(3, 4)[::-1]
    assert precision.plan_gemm(neg.shape, _element_strides(neg), (4, 2), (2, 1), (3, 2),
                               (2, 1)) is None


def test_gpu_matmul_matches_cupy_for_every_layout():
    if not cupy_available():
        pytest.skip("CuPy with a visible GPU is not available")
    import cupy
    for name, a, _, b, _, _, _ in _layouts():
        a32, b32 = cupy.asarray(a, np.float32), cupy.asarray(b, np.float32)
        expected = cupy.matmul(a32, b32)
        for compute, tol in (("fp32", 1e-5), ("tf32", 2e-2), ("bf16", 5e-2)):
            got = precision.matmul(a32, b32, compute=compute)
            assert parity.rel_error(got, expected) <= tol, (name, compute)


def test_compute_dtype_setting():
    assert precision.compute_dtype() == "fp32"
    with pytest.raises(UserError, match="gpu.compute_dtype must be one of"):
        precision.set_compute_dtype("fp8")


# -- transport with a fake CUDA -------------------------------------------------------

class FakeEvent:
    """Completes after ``lag`` queries (or on wait); then runs its copy, like a stream would."""

    def __init__(self, lag: int, action=None):
        self.lag, self.action, self.fired = lag, action, False

    def fire(self):
        if not self.fired:
            self.fired = True
            if self.action is not None:
                self.action()


class FakeOps:
    def __init__(self, lag: int = 2):
        self.lag = lag
        self.compute_syncs = 0

    def pinned_empty(self, n, dtype=np.float32):
        return np.full(n, np.nan, dtype=dtype)

    def device_empty(self, n, dtype=np.float32):
        return np.full(n, np.nan, dtype=dtype)

    def mark_compute(self):
        return FakeEvent(0)

    def copy_to_host_async(self, host, device, lo, hi, after):
        assert after is not None
        snapshot = device[lo:hi].copy()   # what the stream will copy: the data as of now

        def copy():
            host[lo:hi] = snapshot
        return FakeEvent(self.lag, copy)

    def copy_to_device_async(self, device, host, lo, hi):
        snapshot = host[lo:hi].copy()

        def copy():
            device[lo:hi] = snapshot
        return FakeEvent(self.lag, copy)

    @staticmethod
    def done(event):
        if event.lag <= 0:
            event.fire()
            return True
        event.lag -= 1
        return False

    @staticmethod
    def wait(event):
        event.fire()

    def synchronize_compute(self):
        self.compute_syncs += 1


def test_staged_ranges_reach_mpi_only_after_their_copy():
    ops = FakeOps(lag=2)
    device = np.arange(20, dtype=np.float32)
    host = ops.pinned_empty(20)
    seen = []
    stager = transport.GradStager(ops, device, host)
    stager.begin(lambda lo, hi: seen.append((lo, hi, host[lo:hi].copy())))
    for lo, hi in [(15, 20), (8, 15), (3, 8)]:   # backward order; [0, 3) never reported
        stager.ready(lo, hi)
    assert [s[:2] for s in seen] == [(15, 20)]   # later copies are still in flight
    stager.finish()
    assert [s[:2] for s in seen] == [(15, 20), (8, 15), (3, 8), (0, 3)]
    for lo, hi, data in seen:   # never a stale (NaN) byte: each copy had completed
        np.testing.assert_array_equal(data, device[lo:hi])


def test_negative_control_forwarding_before_the_copy_sees_stale_data():
    ops = FakeOps(lag=3)
    device = np.arange(6, dtype=np.float32)
    host = ops.pinned_empty(6)
    ops.copy_to_host_async(host, device, 0, 6, ops.mark_compute())   # not waited for
    assert np.isnan(host).all()


def test_direct_path_forwards_device_ranges_after_compute_events():
    ops = FakeOps()
    device = np.arange(10, dtype=np.float32)
    seen = []
    stager = transport.GradStager(ops, device, None)
    stager.begin(lambda lo, hi: seen.append((lo, hi)))
    stager.ready(5, 10)
    stager.finish()
    assert seen == [(5, 10), (0, 5)]


class RecordingSync:
    """A stand-in for PSSync: records what it saw and when."""

    def __init__(self, host_params):
        self.host_params = host_params
        self.calls = []

    def traffic(self):
        return {"push_mb": 1.0}

    def pull(self, step):
        self.host_params[:] = step + 1.0   # what MPI would have written
        self.calls.append(("pull", step))

    def start_push(self, grads, touched):
        self.grads = grads
        self.calls.append(("begin", touched))
        return self.grad_ready

    def grad_ready(self, lo, hi):
        self.calls.append(("ready", lo, hi, self.grads[lo:hi].copy()))

    def push(self, step, grads, weight, loss, items, compute_s=0.0):
        self.calls.append(("push", step, grads.copy()))
        return {"loss": loss}


def test_device_sync_stages_pulls_and_pushes():
    ops = FakeOps(lag=1)
    params, grads = np.zeros(8, np.float32), np.zeros(8, np.float32)
    host_params, host_grads = ops.pinned_empty(8), ops.pinned_empty(8)
    inner = RecordingSync(host_params)
    sync = transport.DeviceSync(inner, ops, params, grads, host_params, host_grads)
    assert sync.traffic() == {"push_mb": 1.0}     # the control calls are the inner one's
    sync.pull(0)
    sync.pull(1)                                   # waits for the first upload first
    ops.wait(sync._uploaded)
    np.testing.assert_array_equal(params, 2.0)
    on_grad_ready = sync.start_push(grads, {"wte": [1]})
    grads[:] = np.arange(8)
    on_grad_ready(4, 8)
    on_grad_ready(0, 4)
    stats = sync.push(1, grads, 1.0, 0.5, 4)
    assert stats == {"loss": 0.5}
    kinds = [c[0] for c in inner.calls]
    assert kinds == ["pull", "pull", "begin", "ready", "ready", "push"]
    np.testing.assert_array_equal(inner.calls[-1][2], np.arange(8))
    np.testing.assert_array_equal(inner.calls[3][3], [4, 5, 6, 7])


def test_allreduce_buffer_staged_gather_and_scatter(monkeypatch):
    monkeypatch.delenv(transport.TRANSPORT_ENV, raising=False)
    ops = FakeOps(lag=1)
    buf = transport.AllreduceBuffer(4, "no", ops)
    grads = np.array([1, 2, 3, 4], dtype=np.float32)
    buf.begin(grads)
    buf.grad_ready(2, 4)
    buf.gather(grads, 0.5)
    buf.set_tail([2.0, 1.0, 0.0])
    np.testing.assert_array_equal(buf.buf, [0.5, 1, 1.5, 2, 2, 1, 0])
    np.testing.assert_array_equal(buf.tail(), [2, 1, 0])
    buf.buf[:4] = 9
    copied = buf.scatter(grads)
    np.testing.assert_array_equal(grads, [1, 2, 3, 4])   # the copy is queued, not done
    ops.wait(copied)
    np.testing.assert_array_equal(grads, 9)


@pytest.mark.parametrize("aware,plain,env,expected", [
    ("yes", True, "", "direct"), ("no", True, "", "staged"), ("unknown", True, "", "staged"),
    ("yes", False, "", "staged"), ("unknown", True, "direct", "direct"),
    ("yes", True, "staged", "staged"), ("no", False, "direct", "staged")])
def test_transport_path_choice(monkeypatch, aware, plain, env, expected):
    monkeypatch.setenv(transport.TRANSPORT_ENV, env)
    assert transport.choose_path(aware, plain) == expected


def test_transport_override_must_be_known(monkeypatch):
    monkeypatch.setenv(transport.TRANSPORT_ENV, "fast")
    with pytest.raises(UserError, match="expected auto, direct or staged"):
        transport.choose_path("yes")


# -- bad input: no CuPy, no GPU, more workers than GPUs -------------------------------

FAKE_CUPY = """\
import os, types
__name__ = "cupy"
def _count():
    return int(os.environ.get("FAKE_CUPY_GPUS", "0"))
class _Device:
    def __init__(self, i=0):
        self.id = i
    def use(self):
        pass
runtime = types.SimpleNamespace(getDeviceCount=_count)
cuda = types.SimpleNamespace(runtime=runtime, Device=_Device)
"""


@pytest.fixture
def fake_cupy(tmp_path):
    """(PYTHONPATH with a stand-in cupy reporting FAKE_CUPY_GPUS GPUs, one without cupy)."""
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_CUPY)
    missing = tmp_path / "missing" / "cupy"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named cupy')\n")
    return str(tmp_path / "fake"), str(tmp_path / "missing")


TRAIN = ["train", "workload=synthetic", "synthetic.n_params=64", "train.max_steps=2",
         "train.eval_every=0", "train.peak_flops=1e9", "device=gpu"]


def _env(path: str, **extra) -> dict:
    env = mpi_env("mpich", extra)
    env["PYTHONPATH"] = path + ":" + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("which,gpus,visible,message", [
    ("missing", "0", None,
     "hpcps: error: device = gpu but CuPy is not installed (pip install 'hpcps[gpu]')"),
    ("fake", "0", "", "hpcps: error: device = gpu but no GPU is visible (check CUDA_VISIBLE_DEVICES)"),
])
def test_device_gpu_without_cupy_or_gpu_exits_2(tmp_path, fake_cupy, which, gpus, visible,
                                                message):
    path = fake_cupy[0] if which == "fake" else fake_cupy[1]
    extra = {"FAKE_CUPY_GPUS": gpus}
    if visible is not None:
        extra["CUDA_VISIBLE_DEVICES"] = visible
    cmd = [sys.executable, "-m", "hpcps", *TRAIN, f"out_dir={tmp_path / 'run'}"]
    result = run_command(cmd, 60, _env(path, **extra))
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert lines == [message], describe(result)


@pytest.mark.mpi
def test_more_workers_than_gpus_exits_2_on_every_rank(tmp_path, fake_cupy):
    if mpich_mpirun() is None:
        pytest.skip("mpich is not installed")
    wrapper = textwrap.dedent("""\
        import sys
        from hpcps.cli import main
        code = main(sys.argv[1:])
        print(f"exit {code}", flush=True)
        sys.exit(code)
        """)
    cmd = [mpich_mpirun(), "-n", "3", sys.executable, "-c", wrapper, *TRAIN, "ps.mode=bsp",
           "ps.servers=1", f"out_dir={tmp_path / 'run'}"]
    result = run_command(cmd, 60, _env(fake_cupy[0], FAKE_CUPY_GPUS="1"))
    assert result.returncode == 2, describe(result)
    assert result.stdout.count("exit 2") == 3, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert "worker 1 of the node's workers that see these 1 GPU(s) has no GPU of its own" in lines[0]
    assert "gpu.share = true" in lines[0]


def test_gpu_share_lets_ranks_share_devices(monkeypatch):
    import types
    used = []
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
        Device=lambda i: types.SimpleNamespace(use=lambda: used.append(i)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert [get_backend("gpu", r, share_gpus=True).device_id for r in range(5)] == [0, 1, 0, 1, 0]
    assert used == [0, 1, 0, 1, 0]
    with pytest.raises(UserError, match="worker 2 of the node's workers that see these 2 GPU"):
        get_backend("gpu", 2, share_gpus=False)


def test_gpu_slot_follows_what_the_ranks_see():
    node = [0, 1, 2, 3]
    all_four = {r: ["a", "b", "c", "d"] for r in node}           # no binding: each sees all
    assert [gpu_slot(r, node, all_four) for r in node] == [0, 1, 2, 3]
    bound = {0: ["a"], 1: ["b"], 2: ["c"], 3: ["d"]}              # srun --gpus-per-task=1
    assert [gpu_slot(r, node, bound) for r in node] == [0, 0, 0, 0]
    pairs = {0: ["a", "b"], 1: ["a", "b"], 2: ["c", "d"], 3: ["c", "d"]}
    assert [gpu_slot(r, node, pairs) for r in node] == [0, 1, 0, 1]
    # negative control: the node-local rank alone would send bound ranks to GPUs they lack
    assert [gpu_slot(r, node, all_four) for r in node] != [gpu_slot(r, node, bound) for r in node]

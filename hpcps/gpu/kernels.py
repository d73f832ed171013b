"""Fused CuPy kernels for the GPT layers and AdamW, each next to its NumPy reference.

Every ``*_reference`` function is plain NumPy and states the math; the CuPy
function of the same name without the suffix computes the same thing in one or
two kernel launches instead of a chain of elementwise passes. The tests compare
reference and layer code on the CPU; the device check compares the kernels with
the references on a GPU. Kernels work in float32 and float64 (the gradient
parity checks run in float64) and need C-contiguous arrays.

Row kernels (LayerNorm, softmax, cross-entropy) run one thread block per row
and reduce with warp shuffles; softmax rows are held in registers (up to
``SOFTMAX_PER_THREAD`` elements per thread), so a row is read and written once.
CuPy is imported only when a kernel is first used.
"""

from __future__ import annotations

import functools
import math

import numpy as np

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
SOFTMAX_PER_THREAD = 8
MAX_BLOCK = 1024
SOFTMAX_MAX_COLS = SOFTMAX_PER_THREAD * MAX_BLOCK


# -- NumPy references ------------------------------------------------------------------

def gelu_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gelu(x), gelu'(x)) of GPT-2's tanh GELU: 0.5 x (1 + tanh(k (x + a x^3)))."""
    th = np.tanh(GELU_K * (x + GELU_A * x ** 3))
    y = 0.5 * x * (1.0 + th)
    dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_K * (1.0 + 3.0 * GELU_A * x * x)
    return y, dy


def layernorm_reference(x2: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(xhat, rstd) of the rows of x2: xhat = (x - mean) * rstd, rstd = 1/sqrt(var + eps)."""
    mean = x2.mean(axis=1, keepdims=True)
    var = ((x2 - mean) ** 2).mean(axis=1)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x2 - mean) * rstd[:, None], rstd


def layernorm_backward_reference(dxhat, xhat, rstd) -> np.ndarray:
    """dx from d(xhat): rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), per row."""
    a = dxhat.mean(axis=1, keepdims=True)
    b = (dxhat * xhat).mean(axis=1, keepdims=True)
    return rstd[:, None] * (dxhat - a - xhat * b)


def causal_keep(tq: int, tk: int) -> np.ndarray:
    """(tq, tk) bool: query i sees key j when j <= i + tk - tq."""
    return np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)


def softmax_reference(scores, scale: float, causal: bool) -> np.ndarray:
    """softmax over the last axis of scale * scores, masked keys (causal) get 0."""
    s = scores * scale
    if causal:
        s = np.where(causal_keep(*scores.shape[-2:]), s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward_reference(dp, p, scale: float) -> np.ndarray:
    """d(scores) from d(probs): scale * p * (dp - sum_j dp_j p_j)."""
    return scale * p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def cross_entropy_reference(logits2, targets, ignore_index: int = -1):
    """(mean loss over targets != ignore_index, softmax probabilities) of (N, V) logits."""
    shifted = logits2 - logits2.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=1)
    valid = targets != ignore_index
    safe = np.where(valid, targets, 0)
    nll = np.log(total) - shifted[np.arange(len(targets)), safe]
    loss = (nll * valid).sum() / max(int(valid.sum()), 1)
    return loss, e / total[:, None]


def cross_entropy_backward_reference(probs, targets, ignore_index: int = -1,
                                     dloss: float = 1.0) -> np.ndarray:
    """d loss / d logits: (probs - onehot(target)) * dloss / count, 0 on ignored rows."""
    valid = targets != ignore_index
    grad = probs.copy()
    rows = np.flatnonzero(valid)
    grad[rows, targets[rows]] -= 1.0
    grad *= (valid * (dloss / max(int(valid.sum()), 1)))[:, None]
    return grad


def adamw_reference(p, g, m, v, decay, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, t: int, grad_scale: float = 1.0):
    """One AdamW update (torch semantics) -> new (p, m, v); decay: bool per element."""
    g = g * grad_scale
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = np.where(decay, p * (1.0 - lr * weight_decay), p)
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + eps
    return p - (lr / (1.0 - beta1 ** t)) * m / denom, m, v


# -- CUDA source of the row kernels ----------------------------------------------------

_ROW_SOURCE = r"""
__device__ __forceinline__ float k_exp(float x) { return expf(x); }
__device__ __forceinline__ double k_exp(double x) { return exp(x); }
__device__ __forceinline__ float k_log(float x) { return logf(x); }
__device__ __forceinline__ double k_log(double x) { return log(x); }
__device__ __forceinline__ float k_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double k_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float k_neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double k_neg_inf(double) {
    return -__longlong_as_double(0x7ff0000000000000LL);
}

template <typename T> __device__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T> __device__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) { T w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}
// sh: 33 slots; every thread of the block must call, and gets the block's total
template <typename T> __device__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarp ? sh[lane] : T(0);
        v = warp_sum(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}
template <typename T> __device__ T block_max(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarp ? sh[lane] : k_neg_inf(T(0));
        v = warp_max(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

template <typename T>
__global__ void ln_forward(const T* x, T* xhat, T* rstd, long long rows, int cols, double eps) {
    __shared__ T sh[33];
    const long long r = blockIdx.x;
    const T* xr = x + r * cols;
    T* yr = xhat + r * cols;
    T s = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
    const T mean = block_sum(s, sh) / T(cols);
    T q = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { T d = xr[c] - mean; q += d * d; }
    const T rs = T(1) / k_sqrt(block_sum(q, sh) / T(cols) + T(eps));
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] - mean) * rs;
    if (threadIdx.x == 0) rstd[r] = rs;
}

// dx may alias dxhat: each thread reads its elements before the reductions finish
template <typename T>
__global__ void ln_backward(const T* dxhat, const T* xhat, const T* rstd, T* dx,
                            long long rows, int cols) {
    __shared__ T sh[33];
    const long long r = blockIdx.x;
    const T* dr = dxhat + r * cols;
    const T* hr = xhat + r * cols;
    T a = 0, b = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { a += dr[c]; b += dr[c] * hr[c]; }
    a = block_sum(a, sh) / T(cols);
    b = block_sum(b, sh) / T(cols);
    const T rs = rstd[r];
    T* out = dx + r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[c] = rs * (dr[c] - a - hr[c] * b);
}

#define PER 8
// in place over att (rows of tk): softmax of scale * att; with causal, row r is query
// r % tq and sees keys j <= r % tq + tk - tq, the others become 0. tk <= PER * blockDim.
template <typename T>
__global__ void softmax_forward(T* att, long long rows, int tq, int tk, T scale, int causal) {
    __shared__ T sh[33];
    const long long r = blockIdx.x;
    T* row = att + r * tk;
    int limit = tk;
    if (causal) { int i = (int)(r % tq); limit = min(tk, i + (tk - tq) + 1); }
    T v[PER];
    T mx = k_neg_inf(T(0));
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        v[k] = j < limit ? row[j] * scale : k_neg_inf(T(0));
        mx = v[k] > mx ? v[k] : mx;
    }
    mx = block_max(mx, sh);
    T s = 0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        v[k] = j < limit ? k_exp(v[k] - mx) : T(0);
        s += v[k];
    }
    const T inv = T(1) / block_sum(s, sh);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < tk) row[j] = v[k] * inv;
    }
}

// in place over datt: scale * p * (dp - sum_j dp_j p_j), per row of tk
template <typename T>
__global__ void softmax_backward(T* datt, const T* att, long long rows, int tk, T scale) {
    __shared__ T sh[33];
    const long long r = blockIdx.x;
    T* drow = datt + r * tk;
    const T* prow = att + r * tk;
    T dp[PER], p[PER];
    T dot = 0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        dp[k] = j < tk ? drow[j] : T(0);
        p[k] = j < tk ? prow[j] : T(0);
        dot += dp[k] * p[k];
    }
    dot = block_sum(dot, sh);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < tk) drow[j] = scale * p[k] * (dp[k] - dot);
    }
}

// probs = softmax(logits) per row; nll[r] = -log probs[r, target] (0 when ignored)
template <typename T, typename I>
__global__ void xent_forward(const T* logits, const I* targets, T* probs, T* nll,
                             long long rows, int vocab, long long ignore) {
    __shared__ T sh[33];
    const long long r = blockIdx.x;
    const T* lr = logits + r * vocab;
    T* pr = probs + r * vocab;
    T mx = k_neg_inf(T(0));
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = lr[c] > mx ? lr[c] : mx;
    mx = block_max(mx, sh);
    T s = 0;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += k_exp(lr[c] - mx);
    s = block_sum(s, sh);
    const T inv = T(1) / s;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) pr[c] = k_exp(lr[c] - mx) * inv;
    if (threadIdx.x == 0) {
        const long long t = (long long)targets[r];
        nll[r] = t == ignore ? T(0) : k_log(s) - (lr[t] - mx);
    }
}
"""

_ROW_KERNELS = ("ln_forward", "ln_backward", "softmax_forward", "softmax_backward")
_TYPES = {"float32": "float", "float64": "double"}
_INDEX_TYPES = {"int64": "long long", "int32": "int"}


@functools.lru_cache(maxsize=None)
def _module():
    import cupy
    names = [f"{k}<{t}>" for k in _ROW_KERNELS for t in _TYPES.values()]
    names += [f"xent_forward<{t}, {i}>" for t in _TYPES.values() for i in _INDEX_TYPES.values()]
    return cupy.RawModule(code=_ROW_SOURCE, options=("-std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, dtype: str, index_dtype: str = ""):
    t = _TYPES.get(dtype)
    if t is None:
        raise TypeError(f"fused kernels support float32 and float64, not {dtype}")
    if index_dtype:
        return _module().get_function(f"{name}<{t}, {_INDEX_TYPES[index_dtype]}>")
    return _module().get_function(f"{name}<{t}>")


def _block(cols: int, per_thread: int = 1) -> int:
    """Threads per row block: a multiple of 32 covering cols / per_thread, at most 1024."""
    need = -(-cols // per_thread)
    return int(min(MAX_BLOCK, max(32, -(-need // 32) * 32)))


def _check_contiguous(*arrays) -> None:
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("fused kernels need C-contiguous arrays")


# -- fused kernels (CuPy) --------------------------------------------------------------

def layernorm_forward(x2, eps: float, xhat, rstd) -> None:
    """xhat, rstd of the rows of the (N, C) array x2 (one block per row)."""
    _check_contiguous(x2, xhat, rstd)
    rows, cols = x2.shape
    _kernel("ln_forward", x2.dtype.name)((rows,), (_block(cols),),
                                         (x2, xhat, rstd, np.int64(rows), np.int32(cols),
                                          np.float64(eps)))


def layernorm_backward(dxhat, xhat, rstd, dx) -> None:
    """dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)); dx may be dxhat."""
    _check_contiguous(dxhat, xhat, rstd, dx)
    rows, cols = xhat.shape
    _kernel("ln_backward", xhat.dtype.name)((rows,), (_block(cols),),
                                            (dxhat, xhat, rstd, dx, np.int64(rows),
                                             np.int32(cols)))


def softmax_supported(tk: int) -> bool:
    return 1 <= tk <= SOFTMAX_MAX_COLS


def softmax_forward(att, scale: float, causal: bool) -> None:
    """In place: att (..., tq, tk) <- softmax(scale * att) over the last axis, causal keys
    j > i + tk - tq masked to 0."""
    _check_contiguous(att)
    tq, tk = att.shape[-2:]
    rows = att.size // tk
    _kernel("softmax_forward", att.dtype.name)(
        (rows,), (_block(tk, SOFTMAX_PER_THREAD),),
        (att, np.int64(rows), np.int32(tq), np.int32(tk), att.dtype.type(scale),
         np.int32(1 if causal else 0)))


def softmax_backward(datt, att, scale: float) -> None:
    """In place: datt <- scale * att * (datt - rowsum(datt * att))."""
    _check_contiguous(datt, att)
    tk = att.shape[-1]
    rows = att.size // tk
    _kernel("softmax_backward", att.dtype.name)(
        (rows,), (_block(tk, SOFTMAX_PER_THREAD),),
        (datt, att, np.int64(rows), np.int32(tk), att.dtype.type(scale)))


def cross_entropy_forward(logits2, targets, ignore_index: int, probs, nll) -> None:
    """probs = softmax rows of (N, V) logits2; nll[r] = -log probs[r, t_r] (0 if ignored)."""
    _check_contiguous(logits2, targets, probs, nll)
    rows, vocab = logits2.shape
    _kernel("xent_forward", logits2.dtype.name, targets.dtype.name)(
        (rows,), (_block(vocab, 8),),
        (logits2, targets, probs, nll, np.int64(rows), np.int32(vocab), np.int64(ignore_index)))


@functools.lru_cache(maxsize=None)
def _xent_backward_kernel():
    import cupy
    return cupy.ElementwiseKernel(
        "raw I targets, raw T scale, int64 vocab, int64 ignore", "T p",
        """
        const long long row = i / vocab;
        const long long t = (long long)targets[row];
        p = t == ignore ? T(0) : (p - ((i - row * vocab) == t ? T(1) : T(0))) * scale[0];
        """,
        "hpcps_xent_backward")


def cross_entropy_backward(probs, targets, ignore_index: int, scale) -> None:
    """In place: probs <- (probs - onehot(target)) * scale[0], 0 on ignored rows.
    scale: a 1-element device array (dloss / count stays on the GPU: no sync)."""
    _check_contiguous(probs, targets)
    _xent_backward_kernel()(targets, scale, np.int64(probs.shape[-1]), np.int64(ignore_index),
                            probs)


@functools.lru_cache(maxsize=None)
def _gelu_kernel():
    import cupy
    return cupy.ElementwiseKernel(
        "T x", "T y, T d",
        f"""
        const T k = {GELU_K!r}, a = {GELU_A!r};
        const T x2 = x * x;
        const T th = tanh(k * (x + a * x2 * x));
        const T h = (T(1) + th) * T(0.5);
        y = x * h;
        d = h + T(0.5) * x * (T(1) - th * th) * k * (T(1) + T(3) * a * x2);
        """,
        "hpcps_gelu_forward")


def gelu_forward(x, out, grad) -> None:
    """out = gelu(x) and grad = gelu'(x) in one pass (the backward is dout * grad)."""
    _gelu_kernel()(x, out, grad)


@functools.lru_cache(maxsize=None)
def _adamw_kernel():
    import cupy
    return cupy.ElementwiseKernel(
        "T g, uint8 decay, T b1, T b2, T a1, T a2, T keep, T inv_sqrt_bc2, T eps, T step",
        "T p, T m, T v",
        """
        m = b1 * m + a1 * g;
        v = b2 * v + a2 * g * g;
        const T kept = decay ? p * keep : p;
        p = kept - step * (m / (sqrt(v) * inv_sqrt_bc2 + eps));
        """,
        "hpcps_adamw")


def adamw_update(params, grad, m, v, decay, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, t: int, grad_scale: float = 1.0) -> None:
    """The whole AdamW update of adamw_reference in one kernel (fp32, in place)."""
    f = params.dtype.type
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    _adamw_kernel()(grad, decay, f(beta1), f(beta2), f((1.0 - beta1) * grad_scale),
                    f((1.0 - beta2) * grad_scale * grad_scale), f(1.0 - lr * weight_decay),
                    f(1.0 / math.sqrt(bc2)), f(eps), f(lr / bc1), params, m, v)

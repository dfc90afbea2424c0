"""Fused operations with hand-written gradients: where the level-batched fast path spends its time.

autograd can differentiate any `autograd.numpy` program, but its generic rules are slow exactly where
a transformer works hardest. Indexing and broadcasting gradients go through `np.add.at` and
`unbroadcast`, a softmax becomes a dozen recorded ops with a full-size temporary each, and some
rules (mean, max, where) hand back float64. Each op here is one `@primitive` whose VJP is written
out by hand, in float32, with the math in its docstring:

  linear(x, W, b, axes)                  x·W + b, batched over the N models of a level
  rmsnorm(x, g, eps)                     x / sqrt(mean(x²) + eps) · (1 + g)
  embedding(E, ids)                      E[:, ids]; its gradient is a one-hot matmul, not np.add.at
  geglu(a, u)                            gelu(a) · u
  causal_attention(q, k, v, theta, start) RoPE, causal softmax(q·kᵀ/√h), ·v, all models and heads
  cross_entropy(logits, targets)         mean of logsumexp(logits) − logits[target], per model

Next to each one sits `*_reference`, the same function in plain `autograd.numpy`, which
tests/test_ops.py compares against (STYLE.md section 6).

Shapes use the letters of the model: N models of one level, B batch, T time, M = B·T rows,
H query heads, K key/value heads, G = H/K query heads per key head, h head dim, V vocabulary.

Two process-wide settings come with importing this module, both explained where they are made:
the heavy ops run on THREADS worker threads of our own with single-threaded BLAS (`parallel_map`;
TINYFRACTAL_THREADS=1 turns this off), and glibc's malloc keeps freed memory for reuse
(`_keep_freed_memory`).
"""
import contextlib
import ctypes
import itertools
import os
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as onp
import autograd.numpy as np
from autograd.extend import primitive, defvjp, defvjp_argnums

from tinyfractal.core import formulas
from tinyfractal.core.formulas import GELU_C as _GELU_C, GELU_K as _GELU_K, rope_tables

ATTENTION_BLOCK = 64   # query positions per causal block; see causal_attention


# What the backward needs, handed over from the forward.

_saved = {}


def _save(out, *residuals):
    """Keep intermediate results for the backward, keyed by the output array.

    autograd hands a VJP maker only the inputs and the output, so a primitive that wants to give its
    backward something it computed on the way (attention probabilities, say) leaves it here. The VJP
    maker takes it right after the forward; if no gradient is being traced, the entry goes away with
    the output array.
    """
    key = id(out)
    _saved[key] = (residuals, weakref.finalize(out, _saved.pop, key, None))


def _take(out):
    residuals, finalizer = _saved.pop(id(out))
    finalizer.detach()
    return residuals


# Threads and the profile clock.

def _openblas_thread_setter():
    """numpy's bundled OpenBLAS's set_num_threads, or None if this numpy uses another BLAS.

    The symbol is not exposed by numpy, so we find the loaded library in /proc/self/maps (Linux).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("set_", "get_"), None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                return setter, getter
    return None


def _keep_freed_memory():
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the OS (Linux only).

    A training step allocates and frees the same few hundred MB of arrays every time. By default glibc
    serves each large array with a fresh mmap, and the kernel zero-fills every page on first touch:
    we measured ~110k page faults and ~0.5-0.7 s of system time per `original` step, a third of the
    step's CPU time. With the mmap threshold at its maximum (32 MB) and no trimming of the heap, freed
    arrays are reused and the faults disappear. Peak memory is unchanged; memory is just not returned
    between steps. A no-op where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


_keep_freed_memory()
_blas = _openblas_thread_setter()
THREADS = int(os.environ.get("TINYFRACTAL_THREADS", os.cpu_count() or 1)) if _blas else 1
_pool = None
_pool_lock = threading.Lock()


class _FreeCores:
    """How many cores the rest of the machine leaves us, re-estimated at most every `every` seconds.

    Why: splitting work over threads pays only when the cores are free. On a machine shared with
    other busy processes a helper thread is often descheduled halfway through its piece, and the
    caller waits for it: we measured a tiny-preset step at 0.34 s on two threads against 0.21 s on
    one while two other processes were running. So we look at /proc/stat (all cores' busy time),
    subtract our own CPU time, and give parallel_map only the cores that are left. Without
    /proc/stat (not Linux) every core counts as free.
    """

    def __init__(self, every=0.5):
        self.every, self.last, self.free = every, None, float(os.cpu_count() or 1)

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = sum(ticks) - ticks[3] - ticks[4]                    # all but idle and iowait
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def __call__(self):
        if self.last is not None and time.perf_counter() - self.last[0] < self.every:
            return self.free
        try:
            now = self._sample()
        except (OSError, ValueError, IndexError):
            return self.free
        if self.last is not None:
            wall, busy, ours = (a - b for a, b in zip(now, self.last))
            self.free = (os.cpu_count() or 1) - max(0.0, busy - ours) / wall
        self.last = now
        return self.free


_free_cores = _FreeCores()


def parallel_map(fn, pieces):
    """[fn(p) for p in pieces], shared among the calling thread and up to THREADS - 1 helper threads,
    with BLAS running one thread per call meanwhile.

    Why: OpenBLAS wakes its own threads for every matmul and makes them spin at a barrier. For the
    hundreds of small matmuls of attention that handoff costs more than the math, and on a machine
    shared with other processes a descheduled BLAS thread stalls the others: we measured 5-50x
    slowdowns against one thread. NumPy releases the GIL inside its loops and BLAS calls, so our own
    threads, each running whole pieces with single-threaded BLAS, keep the free cores busy and each
    piece's tiles in cache. The calling thread takes pieces too, from the same counter, so a
    two-piece job costs one handoff. Only as many threads as there are free cores join in (_FreeCores).
    """
    global _pool
    if THREADS <= 1:
        return [fn(p) for p in pieces]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="tinyfractal")
        before = _blas[1]() if _blas else None
        if _blas:
            _blas[0](1)
        results, counter = [None] * len(pieces), itertools.count()

        def drain():
            for i in iter(counter.__next__, None):
                if i >= len(pieces):
                    return
                results[i] = fn(pieces[i])

        workers = max(1, min(THREADS, len(pieces), int(_free_cores() + 0.5)))
        helpers = [_pool.submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        finally:
            for helper in helpers:
                helper.result()
            if _blas:
                _blas[0](before)
        return results


MIN_WORK = 1 << 16   # below ~this many element-ops per piece, handing work to a thread costs more than it saves
_ONE_PER_THREAD = 1 << 60   # a target so large that _count gives one piece per thread


def _count(n, cost_each, target):
    """How many pieces to cut n items of cost_each into: about `target` work each, at least THREADS
    of them, and just one (run in the calling thread) when the whole job is small."""
    total = n * cost_each
    if THREADS <= 1 or total < 2 * MIN_WORK:
        return 1
    return min(n, max(THREADS, -(-total // target)))


def _chunks(n, cost_each, target=1 << 18):
    """range(n) cut into _count(...) slices."""
    count = _count(n, cost_each, target)
    edges = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _row_pieces(N, R, cost_per_row, target=1 << 18):
    """(models, rows) slices covering an (N, R, ...) array, about `target` work each."""
    count = _count(N * R, cost_per_row, target)
    if count == 1:
        return [(slice(None), slice(None))]
    per_model = min(R, -(-count // N))
    return [(slice(n, n + 1), slice(R * i // per_model, R * (i + 1) // per_model))
            for n in range(N) for i in range(per_model)]


def batched_matmul(a, b):
    """(N,m,k) @ (N,k,n) -> (N,m,n), split over THREADS threads (see parallel_map).

    The split runs along models when there are enough of them, else along the rows of each model,
    so every thread gets one large single-threaded matmul. Small products stay in the calling thread.
    """
    N, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    out = onp.empty((N, m, n), dtype=onp.result_type(a, b))
    if THREADS <= 1 or N * m * k * n < 32 * MIN_WORK:
        pieces = [(slice(None), slice(None))]
    elif N >= THREADS:
        pieces = [(slice(N * i // THREADS, N * (i + 1) // THREADS), slice(None)) for i in range(THREADS)]
    else:
        pieces = [(slice(j, j + 1), slice(m * i // THREADS, m * (i + 1) // THREADS))
                  for j in range(N) for i in range(THREADS)]

    def piece(p):
        models, rows = p
        onp.matmul(a[models, rows], b[models], out=out[models, rows])
    parallel_map(piece, pieces)
    return out


_profile = None
_profile_lock = threading.Lock()
_now = time.perf_counter


@contextlib.contextmanager
def profiling(clock=time.perf_counter):
    """Collect seconds spent per category of op inside this block: {category: seconds}.

    `clock` is wall time by default; time.thread_time measures CPU time instead, which a busy
    machine disturbs less (with THREADS = 1).
    """
    global _profile, _now
    saved = _profile, _now
    _profile, _now = defaultdict(float), clock
    try:
        yield _profile
    finally:
        _profile, _now = saved


@contextlib.contextmanager
def _clock(category):
    if _profile is None:
        yield
        return
    t0 = _now()
    try:
        yield
    finally:
        with _profile_lock:
            _profile[category] += _now() - t0


def _record_split(wall, busy):
    """Share `wall` seconds among categories in proportion to their summed thread time `busy`."""
    total = sum(busy.values())
    if _profile is not None and total > 0:
        with _profile_lock:
            for category, seconds in busy.items():
                _profile[category] += wall * seconds / total


# linear

def _as_matrices(x, W, axes):
    """x (N, ..., A...) and W (N, A..., O...) as (N, M, A) and (N, A, O), with A the `axes` contracted axes."""
    N, lead, rest = x.shape[0], x.shape[1:x.ndim - axes], W.shape[1 + axes:]
    if x.shape[x.ndim - axes:] != W.shape[1:1 + axes] or W.shape[0] != N:
        raise ValueError(f"linear cannot contract the last {axes} axes of x {x.shape} with W {W.shape}")
    A = int(onp.prod(W.shape[1:1 + axes], dtype=int))
    return x.reshape(N, -1, A), W.reshape(N, A, -1), lead, rest


@primitive
def linear(x, W, b=None, axes=1):
    """x·W + b for every model, contracting the last `axes` axes of x with the first of W.

    x (N,...,A...), W (N,A...,O...), b (N,O...) or None -> (N,...,O...). Taking any shapes (q comes
    out as (N,B,T,H,h) directly) saves the reshapes autograd would otherwise record around it.
    """
    x2, W2, lead, rest = _as_matrices(x, W, axes)
    with _clock("matmul: weights"):
        y = batched_matmul(x2, W2)
        if b is not None:
            y += b.reshape(b.shape[0], 1, -1)
    return y.reshape((x.shape[0],) + lead + rest)


def _linear_vjp(argnums, ans, args, kwargs):
    x, W = args[0], args[1]
    b = args[2] if len(args) > 2 else kwargs.get("b")
    axes = args[3] if len(args) > 3 else kwargs.get("axes", 1)

    def vjp(g):
        # dx = g·Wᵀ, dW = xᵀ·g (threads split W's rows, so none of them sums into another's entries),
        # db = Σ_rows g
        x2, W2, _, _ = _as_matrices(x, W, axes)
        g2 = g.reshape(x2.shape[0], x2.shape[1], W2.shape[2])
        with _clock("matmul: weights"):
            grads = {0: lambda: batched_matmul(g2, onp.swapaxes(W2, 1, 2)).reshape(x.shape),
                     1: lambda: batched_matmul(onp.swapaxes(x2, 1, 2), g2).reshape(W.shape),
                     2: lambda: g2.sum(axis=1).reshape(b.shape)}
            return tuple(grads[i]() for i in argnums)
    return vjp


defvjp_argnums(linear, _linear_vjp)


def linear_reference(x, W, b=None, axes=1):
    N = x.shape[0]
    A = int(onp.prod(W.shape[1:1 + axes], dtype=int))
    y = np.matmul(np.reshape(x, (N, -1, A)), np.reshape(W, (N, A, -1)))
    if b is not None:
        y = y + np.reshape(b, (N, 1, -1))
    return np.reshape(y, x.shape[:x.ndim - axes] + W.shape[1 + axes:])


# rmsnorm

def _gain_shape(x, g):
    """(N,d) -> (N,1,...,1,d) so the gain of model n meets every row of x[n]."""
    return (g.shape[0],) + (1,) * (x.ndim - 2) + (g.shape[1],)


def _inverse_rms(x, eps):
    """1 / sqrt(mean(x², last axis) + eps), keeping the axis. einsum sums the squares without a temporary."""
    r = onp.einsum("...d,...d->...", x, x)[..., None]
    r *= 1.0 / x.shape[-1]
    r += eps
    onp.sqrt(r, out=r)
    return onp.reciprocal(r, out=r)


@primitive
def rmsnorm(x, g, eps):
    """rmsnorm: x / sqrt(mean(x², last axis) + eps) · (1 + g). x (N,...,d), g (N,d) -> like x."""
    N, d = g.shape
    x3 = x.reshape(N, -1, d)
    y, r = onp.empty(x3.shape, dtype=x.dtype), onp.empty(x3.shape[:2] + (1,), dtype=x.dtype)
    gain = 1.0 + g

    def piece(p):
        n, rows = p
        r[n, rows] = _inverse_rms(x3[n, rows], eps)
        onp.multiply(x3[n, rows], r[n, rows], out=y[n, rows])
        y[n, rows] *= gain[n, None, :]

    with _clock("norms"):
        parallel_map(piece, _row_pieces(N, x3.shape[1], d))
    y = y.reshape(x.shape)
    _save(y, r)
    return y


def _rmsnorm_vjp(argnums, ans, args, kwargs):
    x, g, eps = args
    r, = _take(ans)

    def vjp(dy):
        # with n = x·r, r = 1/sqrt(mean(x²)+eps):  dg = Σ_rows dy·n,  dn = dy·(1+g),
        # dx = r·(dn − n·mean(dn·n))
        N, d = g.shape
        x3, dy3, gain = x.reshape(N, -1, d), dy.reshape(N, -1, d), 1.0 + g
        dx = onp.empty(x3.shape, dtype=dy.dtype)
        pieces = _row_pieces(N, x3.shape[1], d)

        def piece(p):
            n, rows = p
            normed = x3[n, rows] * r[n, rows]
            if 0 in argnums:
                dn = dy3[n, rows] * gain[n, None, :]
                dot = onp.einsum("nmd,nmd->nm", dn, normed)[..., None]
                dot *= 1.0 / d
                dn -= normed * dot
                onp.multiply(dn, r[n, rows], out=dx[n, rows])
            return onp.einsum("nmd,nmd->nd", dy3[n, rows], normed) if 1 in argnums else None

        with _clock("norms"):
            parts = parallel_map(piece, pieces)
            dg = onp.zeros(g.shape, dtype=dy.dtype)
            for (n, _), part in zip(pieces, parts):
                if part is not None:
                    dg[n] += part
        grads = {0: dx.reshape(x.shape), 1: dg}
        return tuple(grads[i] for i in argnums)
    return vjp


defvjp_argnums(rmsnorm, _rmsnorm_vjp)


def rmsnorm_reference(x, g, eps):
    return formulas.rmsnorm(x, np.reshape(g, _gain_shape(x, g)), eps)


# embedding

@primitive
def embedding(E, ids):
    """Rows of every model's embedding. E (N,V,d), ids (B,T) ints -> (N,B,T,d)."""
    with _clock("embedding"):
        return E[:, ids]


def _embedding_vjp(ans, E, ids):
    def vjp(g):
        # dE[n] = onehot(ids)ᵀ · g[n]: one matmul that sums repeated ids, where autograd's
        # generic indexing gradient would call the slow np.add.at.
        with _clock("embedding"):
            N, V, d = E.shape
            flat = onp.asarray(ids).reshape(-1)
            onehot = onp.zeros((flat.size, V), dtype=g.dtype)
            onehot[onp.arange(flat.size), flat] = 1.0
            return batched_matmul(onp.broadcast_to(onehot.T, (N, V, flat.size)), g.reshape(N, flat.size, d))
    return vjp


defvjp(embedding, _embedding_vjp)


def embedding_reference(E, ids):
    return E[:, onp.asarray(ids)]


# GeGLU



def _gelu_sigmoid(a, out):
    """out = σ(2z) with z = c·(a + k·a³), so that gelu(a) = a·σ(2z) = a·½(1 + tanh z).

    The sigmoid form needs one exp where tanh costs 2.5x more in NumPy. Where exp(−2z)
    overflows to inf the sigmoid is exactly 0, so the overflow is silenced, not clipped
    (autograd's own rule for tanh, 1/cosh², warned there).
    """
    onp.multiply(a, a, out=out)
    out *= -2.0 * _GELU_C * _GELU_K
    out -= 2.0 * _GELU_C
    out *= a
    with onp.errstate(over="ignore"):
        onp.exp(out, out=out)
    out += 1.0
    return onp.reciprocal(out, out=out)


@primitive
def geglu(a, u):
    """GeGLU: gelu(a) · u, with the tanh form of gelu. a, u (...) -> (...)."""
    if a.shape != u.shape:
        raise ValueError(f"geglu needs a and u of one shape, got {a.shape} and {u.shape}")
    sig = onp.empty_like(a)                                   # σ(2z), kept for the backward
    out = onp.empty_like(a)
    fa, fu, fsig, fout = (x.reshape(-1) for x in (a, u, sig, out))

    def piece(s):
        _gelu_sigmoid(fa[s], fsig[s])
        onp.multiply(fsig[s], fa[s], out=fout[s])
        fout[s] *= fu[s]

    with _clock("geglu"):
        parallel_map(piece, _chunks(a.size, 1))
    _save(out, sig)
    return out


def _geglu_vjp(argnums, ans, args, kwargs):
    a, u = args
    sig, = _take(ans)

    def vjp(g):
        # gelu(a) = a·σ,  gelu'(a) = σ + gelu(a)·(1−σ)·2c·(1 + 3k·a²)
        # da = g·u·gelu'(a),  du = g·gelu(a)
        da, du = onp.empty_like(a), onp.empty_like(u)
        fa, fu, fsig, fg, fda, fdu = (x.reshape(-1) for x in (a, u, sig, g, da, du))

        def piece(s):
            a, sg, d = fa[s], fsig[s], fda[s]
            gelu = a * sg
            onp.multiply(fg[s], gelu, out=fdu[s])
            onp.multiply(a, a, out=d)
            d *= 6.0 * _GELU_C * _GELU_K
            d += 2.0 * _GELU_C
            d *= gelu
            d *= 1.0 - sg                      # with the line before: the a·σ·(1−σ)·2c(1+3k·a²) term
            d += sg
            d *= fu[s]
            d *= fg[s]

        with _clock("geglu"):
            parallel_map(piece, _chunks(a.size, 1))
        return tuple({0: da, 1: du}[i] for i in argnums)
    return vjp


defvjp_argnums(geglu, _geglu_vjp)


def geglu_reference(a, u):
    return formulas.geglu(a, u)


# causal attention

def _rope_tables(T, h, heads, theta, start, dtype, scale=1.0):
    """RoPE as one elementwise formula over all heads: rope(x) = x·C + swap(x)·S.

    swap exchanges the two halves of every head (a gather with `perm`), C = [cos, cos] and
    S = [−sin, sin] per head, times `scale`. Working on whole (T, heads·h) rows keeps NumPy's
    inner loops long even when a head has only 2 or 4 coordinates. -> C, S (T, heads·h), perm.
    """
    cos, sin = rope_tables(T, h, theta, start)
    C = onp.tile(onp.concatenate([cos, cos], axis=1), heads) * scale
    S = onp.tile(onp.concatenate([-sin, sin], axis=1), heads) * scale
    perm = onp.arange(heads * h).reshape(heads, 2, h // 2)[:, ::-1].reshape(-1)
    return C.astype(dtype), S.astype(dtype), perm


def _rope(x, C, S, perm, out=None):
    """x (..., T, W) -> x·C + swap(x)·S."""
    out = onp.multiply(x, C, out=out)
    out += onp.take(x, perm, axis=-1) * S
    return out


def _rope_transposed(dy, C, S, perm, out=None):
    """The VJP of _rope: dx = dy·C + swap(dy·S) (swap is its own transpose)."""
    out = onp.multiply(dy, C, out=out)
    out += onp.take(dy * S, perm, axis=-1)
    return out


def _blocks(T, size):
    """Query blocks [t0, t1) of the causal triangle."""
    return [(t0, min(T, t0 + size)) for t0 in range(0, T, size)]


def _check_heads(q, k, v):
    if q.ndim != 5 or k.shape != v.shape or k.shape[:3] != q.shape[:3] or k.shape[4] != q.shape[4] \
            or q.shape[3] % k.shape[3] or q.shape[4] % 2:
        raise ValueError(f"causal_attention needs q (N,B,T,H,h) and k, v (N,B,T,K,h) with K dividing H and h even; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")


def _group(x, K, h):
    """(c,T,K·G·h) -> (c·K, T·G, h): the query heads that share a key head become rows of one matrix.

    A copy with the K axis moved in front of time (for K = 1 only a reshape)."""
    c, T, W = x.shape
    return onp.ascontiguousarray(x.reshape(c, T, K, W // K).transpose(0, 2, 1, 3)).reshape(c * K, -1, h)


def _ungroup(x, K, out):
    """The inverse of _group, written into out (c,T,K·G·h)."""
    c, T, W = out.shape
    out.reshape(c, T, K, W // K)[...] = x.reshape(c, K, T, W // K).transpose(0, 2, 1, 3)
    return out


@primitive
def causal_attention(q, k, v, theta, start=0):
    """softmax(rope(q)·rope(k)ᵀ/√h, causal)·v for every model, batch row and head.

    q (N,B,T,H,h), k and v (N,B,T,K,h) -> (N,B,T,H,h). Positions start at `start` (for RoPE).

    How it stays fast:
    - Multi-query without repeating k and v: the G = H/K query heads that share a key head are
      stacked as extra rows, so each (model, batch, key head) is one (T·G, h) x (h, T) matmul.
    - The causal triangle is cut into query blocks of ATTENTION_BLOCK positions; block [t0, t1)
      only meets keys [0, t1), so most of the masked upper half is never computed, and only the
      diagonal tile needs a mask.
    - The forward keeps exp(scores − max) of each block and 1/rowsum for the backward; the
      normalisation is applied to the (narrow) outputs, not to the (wide) probabilities.
      The backward uses rowsum(dP·P) = rowsum(dO·O).
    - The (model, batch) rows are split into one chunk per thread (see parallel_map), RoPE
      included. Smaller chunks would keep tiles in L2, but every NumPy call hands the GIL over
      once more; with two threads we measured one chunk each at 30 ms for a level-2 layer
      against 65-70 ms for one chunk per (model, batch) row (and 55-60 ms on one thread).
    """
    _check_heads(q, k, v)
    N, B, T, H, h = q.shape
    K = k.shape[3]
    G, NB, dtype = H // K, N * B, q.dtype
    Z = NB * K
    rope_q = _rope_tables(T, h, H, theta, start, dtype, scale=1.0 / onp.sqrt(h))
    rope_k = _rope_tables(T, h, K, theta, start, dtype)
    qf, kf, vf = q.reshape(NB, T, H * h), k.reshape(NB, T, K * h), v.reshape(NB, T, K * h)
    blocks = _blocks(T, ATTENTION_BLOCK)
    Q, O = onp.empty((Z, T * G, h), dtype=dtype), onp.empty((Z, T * G, h), dtype=dtype)
    Kr, V = onp.empty((Z, T, h), dtype=dtype), onp.empty((Z, T, h), dtype=dtype)
    E = [onp.empty((Z, (t1 - t0) * G, t1), dtype=dtype) for t0, t1 in blocks]  # exp(scores − max)
    inv = onp.empty((Z, T * G, 1), dtype=dtype)                                # 1 / rowsum
    out = onp.empty(q.shape, dtype=dtype)
    bias = onp.triu(onp.full((ATTENTION_BLOCK, ATTENTION_BLOCK), -onp.inf, dtype=dtype), 1)[:, None, :]

    def piece(s):
        busy = defaultdict(float)
        zs = slice(s.start * K, s.stop * K)
        c0 = _now()
        Q[zs] = _group(_rope(qf[s], *rope_q), K, h)
        Kr[zs] = _group(_rope(kf[s], *rope_k), K, h)
        V[zs] = _group(vf[s], K, h)
        busy["rope"] += _now() - c0
        for (t0, t1), Eb in zip(blocks, E):
            rows = slice(t0 * G, t1 * G)
            S = Eb[zs]                                                           # (z, (t1-t0)·G, t1)
            c0 = _now()
            onp.matmul(Q[zs, rows], onp.swapaxes(Kr[zs, :t1], 1, 2), out=S)
            c1 = _now()
            S.reshape(S.shape[0], t1 - t0, G, t1)[..., t0:] += bias[:t1 - t0, :, :t1 - t0]
            S -= S.max(axis=-1, keepdims=True)
            onp.exp(S, out=S)
            onp.reciprocal(S.sum(axis=-1, keepdims=True), out=inv[zs, rows])
            c2 = _now()
            onp.matmul(S, V[zs, :t1], out=O[zs, rows])
            c3 = _now()
            O[zs, rows] *= inv[zs, rows]
            busy["matmul: attention"] += (c1 - c0) + (c3 - c2)
            busy["attention softmax"] += c2 - c1
        _ungroup(O[zs], K, out.reshape(NB, T, H * h)[s])
        return busy

    _run_timed(piece, _chunks(NB, H * T * T, target=_ONE_PER_THREAD))
    _save(out, Q, Kr, V, O, E, inv, blocks, rope_q, rope_k)
    return out


def _run_timed(piece, chunks):
    """Run piece over chunks in parallel; split the wall time by the categories each piece reports."""
    t0 = _now()
    busy = parallel_map(piece, chunks)
    total = defaultdict(float)
    for b in busy:
        for category, seconds in b.items():
            total[category] += seconds
    _record_split(_now() - t0, total)


def _attention_vjp(argnums, ans, args, kwargs):
    q, k, v = args[:3]
    Q, Kr, V, O, E, inv, blocks, rope_q, rope_k = _take(ans)

    def vjp(g):
        N, B, T, H, h = q.shape
        K = k.shape[3]
        G, NB = H // K, N * B
        gf = g.reshape(NB, T, H * h)
        dq, dk, dv = onp.empty((NB, T, H * h), q.dtype), onp.empty((NB, T, K * h), q.dtype), onp.empty((NB, T, K * h), q.dtype)

        def piece(s):
            # with P = E·inv:  dV += Pᵀ·dO,  dS = P·(dO·Vᵀ − rowsum(dO·O)),  dQ = dS·K,  dK += dSᵀ·Q
            busy = defaultdict(float)
            zs = slice(s.start * K, s.stop * K)
            dO = _group(gf[s], K, h)
            dQ, dK, dV = onp.empty_like(dO), onp.zeros_like(Kr[zs]), onp.zeros_like(V[zs])
            for (t0, t1), Eb in zip(blocks, E):
                rows = slice(t0 * G, t1 * G)
                Ez = Eb[zs]
                dOs = dO[:, rows] * inv[zs, rows]                                # dO / rowsum
                dot = onp.sum(dOs * O[zs, rows], axis=-1, keepdims=True)
                c0 = _now()
                dV[:, :t1] += onp.matmul(onp.swapaxes(Ez, 1, 2), dOs)
                dS = onp.matmul(dOs, onp.swapaxes(V[zs, :t1], 1, 2))
                c1 = _now()
                dS -= dot
                dS *= Ez
                c2 = _now()
                onp.matmul(dS, Kr[zs, :t1], out=dQ[:, rows])
                dK[:, :t1] += onp.matmul(onp.swapaxes(dS, 1, 2), Q[zs, rows])
                c3 = _now()
                busy["matmul: attention"] += (c1 - c0) + (c3 - c2)
                busy["attention softmax"] += c2 - c1
            c0 = _now()
            _rope_transposed(_ungroup(dQ, K, onp.empty(gf[s].shape, g.dtype)), *rope_q, out=dq[s])
            _rope_transposed(_ungroup(dK, K, onp.empty(dk[s].shape, g.dtype)), *rope_k, out=dk[s])
            _ungroup(dV, K, dv[s])
            busy["rope"] += _now() - c0
            return busy

        _run_timed(piece, _chunks(NB, H * T * T, target=_ONE_PER_THREAD))
        grads = {0: dq.reshape(q.shape), 1: dk.reshape(k.shape), 2: dv.reshape(v.shape)}
        return tuple(grads[i] for i in argnums)
    return vjp


defvjp_argnums(causal_attention, _attention_vjp)


def causal_attention_reference(q, k, v, theta, start=0):
    """The same attention by the formulas: RoPE on q and k, then causal multi-query attention."""
    cos, sin = rope_tables(q.shape[2], q.shape[4], theta, start)
    cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
    return formulas.attend(formulas.rope(q, cos, sin), formulas.rope(k, cos, sin), v)


# cross-entropy

@primitive
def cross_entropy(logits, targets):
    """Mean next-token cross-entropy of each model. logits (N,...,V), targets (...) ints -> (N,).

    loss = mean over rows of logsumexp(logits) − logits[target].
    """
    N, V = logits.shape[0], logits.shape[-1]
    x = logits.reshape(N, -1, V)
    t = onp.asarray(targets).reshape(-1)
    if t.size != x.shape[1]:
        raise ValueError(f"cross_entropy needs one target per row: logits {logits.shape}, targets {onp.shape(targets)}")
    p = onp.empty_like(x)                                                      # softmax, for the backward
    pieces = _row_pieces(N, t.size, V)

    def piece(pc):
        n, rows = pc
        xs, ps, ts = x[n, rows], p[n, rows], t[rows]
        m = xs.max(axis=-1, keepdims=True)
        onp.subtract(xs, m, out=ps)
        onp.exp(ps, out=ps)
        z = ps.sum(axis=-1, keepdims=True)
        ps /= z
        lse = onp.log(z[..., 0]) + m[..., 0]                                   # (n, rows)
        return (lse - xs[:, onp.arange(ts.size), ts]).sum(axis=1)

    with _clock("cross-entropy"):
        loss = onp.zeros(N, dtype=logits.dtype)
        for (n, _), part in zip(pieces, parallel_map(piece, pieces)):
            loss[n] += part
        loss /= t.size
    _save(loss, p)
    return loss


def _cross_entropy_vjp(ans, logits, targets):
    p, = _take(ans)

    def vjp(g):
        # d loss[n] / d logits[n, i] = (softmax(logits[n, i]) − onehot(target_i)) / M
        N, M, V = p.shape
        t = onp.asarray(targets).reshape(-1)
        scale = g / M
        d = onp.empty_like(p)

        def piece(pc):
            n, rows = pc
            ds, ts = d[n, rows], t[rows]
            onp.multiply(p[n, rows], scale[n, None, None], out=ds)
            ds[:, onp.arange(ts.size), ts] -= scale[n, None]                  # each row once: no add.at

        with _clock("cross-entropy"):
            parallel_map(piece, _row_pieces(N, M, V))
        return d.reshape(logits.shape)
    return vjp


defvjp(cross_entropy, _cross_entropy_vjp)


def cross_entropy_reference(logits, targets):
    """Each model's mean cross-entropy by the formula. logits (N,...,V) -> (N,)."""
    N = logits.shape[0]
    return np.stack([formulas.cross_entropy(logits[n], targets) for n in range(N)])

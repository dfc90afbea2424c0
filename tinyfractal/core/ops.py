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

Next to each one sits `*_reference`, the same function written with the formulas of `formulas.py`
in plain `autograd.numpy`, which tests/test_ops.py compares against, values and gradients.

Shapes use the letters of the model: N models of one level, B batch, T time, M = B·T rows,
H query heads, K key/value heads, G = H/K query heads per key head, h head dim, V vocabulary.

How the heavy loops are spread over threads, and timed, is `machinery.py`'s business: each op cuts
its work into pieces (`chunks`, `row_pieces`) and hands them to `parallel_map`. Importing this
module changes nothing in the process; `machinery.tune()` turns the threads on.
"""
import weakref
from collections import defaultdict

import numpy as onp
import autograd.numpy as np
from autograd.extend import primitive, defvjp, defvjp_argnums

from tinyfractal.core import formulas
from tinyfractal.core.machinery import ONE_PER_THREAD, batched_matmul, chunks, clock, now, parallel_map, \
    row_pieces, run_timed
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
    with clock("matmul: weights"):
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
        with clock("matmul: weights"):
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

    with clock("norms"):
        parallel_map(piece, row_pieces(N, x3.shape[1], d))
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
        pieces = row_pieces(N, x3.shape[1], d)

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

        with clock("norms"):
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
    with clock("embedding"):
        return E[:, ids]


def _embedding_vjp(ans, E, ids):
    def vjp(g):
        # dE[n] = onehot(ids)ᵀ · g[n]: one matmul that sums repeated ids, where autograd's
        # generic indexing gradient would call the slow np.add.at.
        with clock("embedding"):
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

    with clock("geglu"):
        parallel_map(piece, chunks(a.size, 1))
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

        with clock("geglu"):
            parallel_map(piece, chunks(a.size, 1))
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
        c0 = now()
        Q[zs] = _group(_rope(qf[s], *rope_q), K, h)
        Kr[zs] = _group(_rope(kf[s], *rope_k), K, h)
        V[zs] = _group(vf[s], K, h)
        busy["rope"] += now() - c0
        for (t0, t1), Eb in zip(blocks, E):
            rows = slice(t0 * G, t1 * G)
            S = Eb[zs]                                                           # (z, (t1-t0)·G, t1)
            c0 = now()
            onp.matmul(Q[zs, rows], onp.swapaxes(Kr[zs, :t1], 1, 2), out=S)
            c1 = now()
            S.reshape(S.shape[0], t1 - t0, G, t1)[..., t0:] += bias[:t1 - t0, :, :t1 - t0]
            S -= S.max(axis=-1, keepdims=True)
            onp.exp(S, out=S)
            onp.reciprocal(S.sum(axis=-1, keepdims=True), out=inv[zs, rows])
            c2 = now()
            onp.matmul(S, V[zs, :t1], out=O[zs, rows])
            c3 = now()
            O[zs, rows] *= inv[zs, rows]
            busy["matmul: attention"] += (c1 - c0) + (c3 - c2)
            busy["attention softmax"] += c2 - c1
        _ungroup(O[zs], K, out.reshape(NB, T, H * h)[s])
        return busy

    run_timed(piece, chunks(NB, H * T * T, target=ONE_PER_THREAD))
    _save(out, Q, Kr, V, O, E, inv, blocks, rope_q, rope_k)
    return out


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
                c0 = now()
                dV[:, :t1] += onp.matmul(onp.swapaxes(Ez, 1, 2), dOs)
                dS = onp.matmul(dOs, onp.swapaxes(V[zs, :t1], 1, 2))
                c1 = now()
                dS -= dot
                dS *= Ez
                c2 = now()
                onp.matmul(dS, Kr[zs, :t1], out=dQ[:, rows])
                dK[:, :t1] += onp.matmul(onp.swapaxes(dS, 1, 2), Q[zs, rows])
                c3 = now()
                busy["matmul: attention"] += (c1 - c0) + (c3 - c2)
                busy["attention softmax"] += c2 - c1
            c0 = now()
            _rope_transposed(_ungroup(dQ, K, onp.empty(gf[s].shape, g.dtype)), *rope_q, out=dq[s])
            _rope_transposed(_ungroup(dK, K, onp.empty(dk[s].shape, g.dtype)), *rope_k, out=dk[s])
            _ungroup(dV, K, dv[s])
            busy["rope"] += now() - c0
            return busy

        run_timed(piece, chunks(NB, H * T * T, target=ONE_PER_THREAD))
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
    pieces = row_pieces(N, t.size, V)

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

    with clock("cross-entropy"):
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

        with clock("cross-entropy"):
            parallel_map(piece, row_pieces(N, M, V))
        return d.reshape(logits.shape)
    return vjp


defvjp(cross_entropy, _cross_entropy_vjp)


def cross_entropy_reference(logits, targets):
    """Each model's mean cross-entropy by the formula. logits (N,...,V) -> (N,)."""
    N = logits.shape[0]
    return np.stack([formulas.cross_entropy(logits[n], targets) for n in range(N)])

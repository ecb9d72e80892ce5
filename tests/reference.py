"""Slow, plain float64 numpy reference implementations that fast paths are tested against.

Each function follows the textbook or published formula as literally as possible (``n x n`` Gram
matrices, explicit centring matrices, Python loops over samples where that is the definition), so
that it is easy to check by eye. They are for tests and benchmarks only: quadratic or cubic in the
number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import stats
from scipy.spatial.distance import pdist

# ---------------------------------------------------------------------------------------------
# CKA (Kornblith et al. 2019; unbiased HSIC of Song et al. 2012)


def gram_linear(x: np.ndarray) -> np.ndarray:
    """Linear kernel ``K = X X^T`` (no centring)."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """RBF kernel with bandwidth ``sigma`` x sqrt(median squared distance over all n^2 pairs), as in
    Kornblith et al.'s reference code (``gram_rbf(x, threshold)``)."""
    x = np.asarray(x, dtype=np.float64)
    dot = x @ x.T
    sq_norms = np.diag(dot)
    sq_dist = -2.0 * dot + sq_norms[:, None] + sq_norms[None, :]
    sq_median = np.median(sq_dist)
    return np.exp(-sq_dist / (2.0 * sigma**2 * sq_median))


def centring_matrix(n: int) -> np.ndarray:
    """``H = I - 11^T / n``."""
    return np.eye(n) - np.full((n, n), 1.0 / n)


def hsic_biased(kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Biased HSIC ``tr(K H L H) / (n - 1)^2`` with the explicit centring matrix."""
    n = kx.shape[0]
    h = centring_matrix(n)
    return np.trace(kx @ h @ ky @ h) / (n - 1) ** 2


def hsic_unbiased(kx: np.ndarray, ky: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, Eq. (5), literally:
    ``[tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))`` with zero diagonals."""
    n = kx.shape[0]
    kt = kx - np.diag(np.diag(kx))
    lt = ky - np.diag(np.diag(ky))
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka_reference(
    x: np.ndarray, y: np.ndarray, *, kernel: str = "linear", sigma: float = 0.8, debiased: bool = False
) -> float:
    """CKA from ``n x n`` Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``."""
    if kernel == "linear":
        kx, ky = gram_linear(x), gram_linear(y)
    else:
        kx, ky = gram_rbf(x, sigma), gram_rbf(y, sigma)
    hsic = hsic_unbiased if debiased else hsic_biased
    return float(hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky)))


def cka_reference_large(x: np.ndarray, y: np.ndarray, *, debiased: bool = False) -> float:
    """The same Gram formula as :func:`cka_reference` for the linear kernel, with centring and the
    Song et al. sums written as O(n^2) reductions instead of n^3 products, so it runs for n = 5000."""
    return cka_from_grams(gram_linear(x), gram_linear(y), debiased=debiased)


def cka_from_grams(kx: np.ndarray, ky: np.ndarray, *, debiased: bool = False) -> float:
    """CKA of two precomputed (uncentred) ``n x n`` Gram matrices, with O(n^2) reductions."""
    n = kx.shape[0]
    if not debiased:

        def centre(gram: np.ndarray) -> np.ndarray:
            row = gram.mean(0, keepdims=True)
            return gram - row - row.T + row.mean()

        kc, lc = centre(kx), centre(ky)
        return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))

    def unbiased(a: np.ndarray, b: np.ndarray) -> float:
        at = a - np.diag(np.diag(a))
        bt = b - np.diag(np.diag(b))
        ra, rb = at.sum(1), bt.sum(1)
        return float(np.sum(at * bt) + ra.sum() * rb.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ra @ rb)

    return unbiased(kx, ky) / np.sqrt(unbiased(kx, kx) * unbiased(ky, ky))


def minibatch_cka_reference(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Size-weighted mean of per-batch unbiased HSIC (Song et al.), then normalised; every batch >= 4 samples."""
    s_xy = s_xx = s_yy = 0.0
    for xb, yb in batches:
        kx, ky = gram_linear(xb), gram_linear(yb)
        m = len(xb)
        s_xy += m * hsic_unbiased(kx, ky)
        s_xx += m * hsic_unbiased(kx, kx)
        s_yy += m * hsic_unbiased(ky, ky)
    return s_xy / np.sqrt(s_xx * s_yy)


# ---------------------------------------------------------------------------------------------
# Procrustes, CCA, RSA


def procrustes_reference(x: np.ndarray, y: np.ndarray, *, angular: bool = False) -> float:
    """Centre, scale to unit Frobenius norm, zero-pad to equal width, rotate ``y`` onto ``x`` with the
    SVD solution of the orthogonal Procrustes problem, and measure the residual."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    x = x / np.linalg.norm(x)
    y = y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    u, s, vt = np.linalg.svd(y.T @ x)
    q = u @ vt
    if angular:
        return float(np.arccos(np.clip(s.sum(), -1.0, 1.0)))
    return float(np.linalg.norm(x - y @ q))


def canonical_correlations_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Textbook CCA: singular values of ``Sxx^{-1/2} Sxy Syy^{-1/2}`` (full-rank data, n > d_x + d_y)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    m = inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y)
    return np.linalg.svd(m, compute_uv=False)


def pwcca_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Morcos et al. (2018) projection weighting with textbook CCA (full-rank data): weights from the
    side with fewer neurons, ``alpha_i = sum_j |<h_i, x_j>|`` with ``h_i`` the orthonormalised canonical
    variates."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    if x.shape[1] > y.shape[1]:
        x, y = y, x

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    sxx = inv_sqrt(x.T @ x)
    m = sxx @ (x.T @ y) @ inv_sqrt(y.T @ y)
    u, rho, _ = np.linalg.svd(m, full_matrices=False)
    variates = x @ sxx @ u  # canonical variates of x, one per column
    q, _ = np.linalg.qr(variates)
    weights = np.abs(q.T @ x).sum(1)
    weights /= weights.sum()
    return float(np.sum(weights * rho))


def rsa_reference(x: np.ndarray, y: np.ndarray, *, rdm: str = "correlation", compare: str = "spearman") -> float:
    """scipy ``pdist`` RDMs compared with ``scipy.stats.spearmanr`` / ``pearsonr``."""
    metric = "correlation" if rdm == "correlation" else "euclidean"
    a = pdist(np.asarray(x, dtype=np.float64), metric=metric)
    b = pdist(np.asarray(y, dtype=np.float64), metric=metric)
    if compare == "spearman":
        return float(stats.spearmanr(a, b).statistic)
    return float(stats.pearsonr(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# relative representations (Moschella et al. 2023)


def relative_reference(x: np.ndarray, anchors: np.ndarray, *, center: bool = False) -> np.ndarray:
    """Cosine similarity of every sample to every anchor, one pair at a time."""
    x = np.asarray(x, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    if center:
        mean = anchors.mean(0)
        x = x - mean
        anchors = anchors - mean
    out = np.zeros((len(x), len(anchors)))
    for i, v in enumerate(x):
        for j, a in enumerate(anchors):
            nv, na = np.linalg.norm(v), np.linalg.norm(a)
            out[i, j] = 0.0 if nv == 0 else v @ a / (nv * na)
    return out


def retrieval_reference(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample Jaccard@k, reciprocal rank and cosine, by loops over samples.

    Sample ``i`` of space A queries space B: its top-k by cosine among all of B is compared with the
    top-k of ``b_i`` itself among all of B; the reciprocal rank is 1 / (1 + number of ``b_j`` strictly
    closer to ``a_i`` than ``b_i``).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    n = len(a)
    jaccard, rr, cosine = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        s_ab = np.array([cos(a[i], b[j]) for j in range(n)])
        s_bb = np.array([cos(b[i], b[j]) for j in range(n)])
        top_ab = set(np.argsort(-s_ab, kind="stable")[:k].tolist())
        top_bb = set(np.argsort(-s_bb, kind="stable")[:k].tolist())
        jaccard[i] = len(top_ab & top_bb) / len(top_ab | top_bb)
        rr[i] = 1.0 / (1 + int(np.sum(np.delete(s_ab, i) > s_ab[i])))
        cosine[i] = cos(a[i], b[i])
    return jaccard, rr, cosine

"""Independent float64 brute-force reference for one EM iteration (design.md section 2b).

Deliberately naive: plain loops over every class, rotation and shift; rotations of
volumes in real space by integer index arithmetic (exact for the 24 cube
rotations, no interpolation); full-grid orthonormal numpy FFTs. Nothing here
imports the library, so the tests that use it are an independent check.

Conventions (design.md section 2):
- volumes (D, D, D) indexed [z, y, x]; coordinates and shifts are (x, y, z);
- rotation centre c = D // 2; (R A)(r) = A(R^T (r - c) + c);
- circular shift (S_t V)(r) = V(r - t);
- full-grid frequencies q = (qx, qy, qz) from ``np.fft.fftfreq(D) * D``,
  array axes [kz, ky, kx].
"""

import itertools
import math

import numpy as np
from scipy.special import logsumexp

FFT_AXES = (-3, -2, -1)


def fftn(v):
    return np.fft.fftn(v, axes=FFT_AXES, norm="ortho")


def ifftn_real(v):
    return np.real(np.fft.ifftn(v, axes=FFT_AXES, norm="ortho"))


def frequencies(D):
    """Integer frequency components (qx, qy, qz) on the full grid, each shaped (D, D, D)."""
    f = np.rint(np.fft.fftfreq(D) * D).astype(int)
    qz, qy, qx = np.meshgrid(f, f, f, indexing="ij")
    return qx, qy, qz


def band(D, max_resolution=0.5):
    """Full-grid indicator of the complete-data components: 0 < |q| < max_resolution * D."""
    qx, qy, qz = frequencies(D)
    r = np.sqrt(qx**2 + qy**2 + qz**2)
    keep = r > 0
    if max_resolution is not None:
        keep &= r < max_resolution * D
    return keep


def hermitian_partner(w):
    """w(-q) for a full-grid array w(q)."""
    D = w.shape[-1]
    idx = (-np.arange(D)) % D
    return w[..., idx, :, :][..., idx, :][..., idx]


def integer_matrix(R):
    Ri = np.rint(R).astype(int)
    if not np.allclose(R, Ri, atol=1e-9):
        raise ValueError("brute force only handles cube rotations (integer matrices)")
    return Ri


def rotate(A, R):
    """(R A)(r) = A(R^T (r - c) + c), r = (x, y, z), c = D // 2, by index arithmetic."""
    Ri = integer_matrix(R)
    D = A.shape[-1]
    c = D // 2
    out = np.empty_like(A)
    for z in range(D):
        for y in range(D):
            for x in range(D):
                s = Ri.T @ (np.array([x, y, z]) - c) + c
                out[..., z, y, x] = A[..., s[2], s[1], s[0]]
    return out


class Rotator:
    """Caches the index maps of `rotate` for a list of rotation matrices (same result, faster)."""

    def __init__(self, matrices, D):
        self.D = D
        self.maps = []
        c = D // 2
        for R in matrices:
            Ri = integer_matrix(R)
            z, y, x = np.meshgrid(np.arange(D), np.arange(D), np.arange(D), indexing="ij")
            r = np.stack([x, y, z]) - c  # (3, D, D, D), (x, y, z)
            s = np.einsum("ji,jzyx->izyx", Ri, r) + c  # R^T (r - c) + c
            assert s.min() >= 0 and s.max() < D
            self.maps.append((s[2], s[1], s[0]))

    def rotate(self, A, r):
        sz, sy, sx = self.maps[r]
        return A[..., sz, sy, sx]


def rotate_fourier_mask(w, R):
    """out(q) = w(R q) on the full grid (the mask w rotated by R^-1); exact for cube rotations."""
    Ri = integer_matrix(R)
    D = w.shape[-1]
    qx, qy, qz = frequencies(D)
    q = np.stack([qx, qy, qz])
    p = np.einsum("ij,jzyx->izyx", Ri, q) % D  # R q, wrapped to array indices
    return w[..., p[2], p[1], p[0]]


def shift(V, t):
    """(S_t V)(r) = V(r - t), circular; t = (tx, ty, tz)."""
    return np.roll(V, (int(t[2]), int(t[1]), int(t[0])), axis=(-3, -2, -1))


def shift_half_width(xi, max_shift, D):
    L = min(math.ceil(6 * xi), D // 2)
    if max_shift is not None:
        L = min(L, int(max_shift))
    return L


def shift_grid(L):
    """All integer (tx, ty, tz) with max |t_j| <= L."""
    return np.array(list(itertools.product(range(-L, L + 1), repeat=3)), dtype=int)


def log_shift_prior(shifts, xi):
    lp = -np.sum(shifts.astype(float) ** 2, axis=1) / (2 * xi**2)
    return lp - logsumexp(lp)


def observed_sets(full_masks, max_resolution=0.5):
    """O_i = mask_i AND 0 < |q| < max_resolution * D (full grid)."""
    D = full_masks.shape[-1]
    return np.asarray(full_masks, bool) & band(D, max_resolution)[None]


class Model:
    def __init__(self, references, alpha, sigma, xi):
        self.references = np.asarray(references, dtype=np.float64)
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.sigma = float(sigma)
        self.xi = float(xi)


def e_step(X, obs, model, rotations, max_shift):
    """Scores of every (k, r, t), log-likelihoods and posteriors (design.md 2b).

    Returns a dict with d (N, K, R, T), gamma (N, K, R, T), l (N,), shifts (T, 3), n (N,).
    """
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape[0], X.shape[-1]
    K = model.references.shape[0]
    mats = rotations.as_matrix()
    nR = len(mats)
    rot = Rotator(mats, D)
    L = shift_half_width(model.xi, max_shift, D)
    shifts = shift_grid(L)
    log_pi = log_shift_prior(shifts, model.xi)
    Xh = fftn(X)
    d = np.zeros((N, K, nR, len(shifts)))
    for k in range(K):
        for r in range(nR):
            RA = rot.rotate(model.references[k], r)
            for j, t in enumerate(shifts):
                Mh = fftn(shift(RA, t))
                for i in range(N):
                    diff = Xh[i][obs[i]] - Mh[obs[i]]
                    d[i, k, r, j] = np.sum(diff.real**2 + diff.imag**2)
    with np.errstate(divide="ignore"):
        log_alpha = np.log(model.alpha)
    term = (
        log_alpha[None, :, None, None]
        - np.log(nR)
        + log_pi[None, None, None, :]
        - d / (2 * model.sigma**2)
    )
    lse = logsumexp(term.reshape(N, -1), axis=1)
    n = obs.reshape(N, -1).sum(axis=1)
    ll = lse - n * np.log(np.sqrt(2 * np.pi) * model.sigma)
    gamma = np.exp(term - lse[:, None, None, None])
    return {"d": d, "gamma": gamma, "l": ll, "shifts": shifts, "n": n, "L": L}


def sufficient_statistics(X, obs, e, rotations):
    """S_k, B_k (real space), W_k (full grid), D_sigma, D_xi (design.md 2b)."""
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape[0], X.shape[-1]
    gamma, d, shifts = e["gamma"], e["d"], e["shifts"]
    K = gamma.shape[1]
    mats = rotations.as_matrix()
    rot_inv = Rotator([R.T for R in mats], D)  # R^-1 = R^T
    wX = ifftn_real(fftn(X) * obs)
    Of = obs.astype(np.float64)
    S = np.zeros(K)
    B = np.zeros((K, D, D, D))
    W = np.zeros((K, D, D, D))
    for r, R in enumerate(mats):
        rotated_masks = rotate_fourier_mask(Of, R)  # O_i(R_r q) for every i
        for k in range(K):
            for j, t in enumerate(shifts):
                for i in range(N):
                    g = gamma[i, k, r, j]
                    S[k] += g
                    B[k] += g * rot_inv.rotate(shift(wX[i], -t), r)
                    W[k] += g * rotated_masks[i]
    D_sigma = float(np.sum(gamma * d))
    D_xi = float(np.sum(gamma * np.sum(shifts.astype(float) ** 2, axis=1)[None, None, None, :]))
    return {"S": S, "B": B, "W": W, "D_sigma": D_sigma, "D_xi": D_xi}


def m_step(
    stats,
    model,
    N,
    n_sum,
    *,
    max_resolution=0.5,
    missing_data="impute",
    n_impute_iter=1,
    threshold=0.1,
    theta=None,
):
    """New Model from the statistics (design.md 2b)."""
    S, W = stats["S"], stats["W"]
    Bh = fftn(stats["B"])
    Ah = fftn(model.references)
    K, D = Ah.shape[0], Ah.shape[-1]
    full = band(D, max_resolution)
    J = int(full.sum())
    sigma2 = model.sigma**2
    if missing_data == "impute":
        for _ in range(n_impute_iter):
            new = Ah.copy()
            for k in range(K):
                if S[k] > 0:
                    new[k] = Ah[k] * (1 - W[k] / S[k]) + Bh[k] / S[k]
            Ah = new
            sigma2 = (sigma2 * (N * J - n_sum) + stats["D_sigma"]) / (N * J)
    elif missing_data == "weighted_average":
        Ah = np.zeros_like(Ah)
        for k in range(K):
            keep = W[k] > threshold
            Ah[k][keep] = Bh[k][keep] / W[k][keep]
        sigma2 = stats["D_sigma"] / n_sum
    else:
        raise ValueError(missing_data)
    if theta is not None and theta > 0:
        tau = theta * N / K
        M = np.diag(S) + tau * (K * np.eye(K) - np.ones((K, K)))
        Ah = np.linalg.solve(M, S[:, None] * Ah.reshape(K, -1)).reshape(Ah.shape)
        pen = 0.0
        for k in range(K):
            for l_ in range(K):
                diff = (Ah[k] - Ah[l_])[full]
                pen += np.sum(diff.real**2 + diff.imag**2)
        sigma2 += tau * pen / (2 * N * J)
    alpha = S / N
    xi = np.sqrt(stats["D_xi"] / (3 * N))
    return Model(ifftn_real(Ah), alpha, np.sqrt(sigma2), xi), Ah


def class_posteriors(e):
    return e["gamma"].sum(axis=(2, 3))

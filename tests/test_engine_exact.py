"""One EM iteration of MissingDataMLClassifier against an independent float64 brute force.

The brute force (tests/brute_force.py) follows design.md section 2b literally:
plain loops over every class, cube rotation and integer shift, real-space
rotation by index arithmetic about c = D // 2, full-grid orthonormal numpy FFTs.
The estimator is used only through its public API.

Every comparison is at 1e-4 relative; class averages are compared on the
complete-data band 0 < |q| < max_resolution * D, relative to the largest
component there.
"""

import brute_force as bf
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

D = 11
N = 12
K = 2
MAX_SHIFT = 1
INIT_XI = 0.8  # ceil(6 xi) = 5, so L = max_shift = 1
NOISE = 1.6  # true noise std; signal std ~0.25: posteriors neither flat nor delta
THRESHOLD = 0.1
RTOL = 1e-4

ROTATIONS = Rotation.create_group("O")
MATS = ROTATIONS.as_matrix()


# --------------------------------------------------------------------------- data


def _blobs(rng, n):
    z, y, x = np.meshgrid(*[np.arange(D)] * 3, indexing="ij")
    c = D // 2
    v = np.zeros((D, D, D))
    for _ in range(n):
        p = rng.uniform(-D / 4, D / 4, 3)
        s = rng.uniform(0.8, 1.5)
        a = rng.uniform(0.5, 1.5)
        v += a * np.exp(
            -((x - c - p[0]) ** 2 + (y - c - p[1]) ** 2 + (z - c - p[2]) ** 2) / (2 * s * s)
        )
    return v


def _masks(rng, n):
    """Full-grid Hermitian-symmetric masks: +-60 wedge about y, about x, random ones."""
    qx, qy, qz = bf.frequencies(D)
    cot60 = 1 / np.tan(np.radians(60))
    wedge_y = ~(np.abs(qx) < cot60 * np.abs(qz))
    wedge_x = ~(np.abs(qy) < cot60 * np.abs(qz))
    out = []
    for i in range(n):
        if i % 3 == 0:
            m = wedge_y
        elif i % 3 == 1:
            m = wedge_x
        else:
            m = rng.random((D, D, D)) < 0.6
            m = m | bf.hermitian_partner(m)
        out.append(m)
    out = np.array(out)
    assert np.array_equal(out, bf.hermitian_partner(out))
    return out


def _simulate(seed, noise, n=N):
    rng = np.random.default_rng(seed)
    A = np.stack([_blobs(rng, 5) for _ in range(K)])
    masks = _masks(rng, n)
    ks = np.arange(n) % K
    rs = rng.integers(0, len(MATS), n)
    ts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (n, 3))
    clean = np.stack([bf.shift(bf.rotate(A[ks[i]], MATS[rs[i]]), ts[i]) for i in range(n)])
    X = clean + noise * rng.standard_normal(clean.shape)
    X = bf.ifftn_real(bf.fftn(X) * masks)
    A0 = 0.75 * A + 0.25 * A[::-1] + 0.1 * np.stack([_blobs(rng, 3) for _ in range(K)])
    return {"A": A, "masks": masks, "ks": ks, "rs": rs, "ts": ts, "X": X, "A0": A0}


@pytest.fixture(scope="module")
def data():
    sim = _simulate(seed=1, noise=NOISE)
    X = sim["X"].astype(np.float32)
    A0 = sim["A0"].astype(np.float32)
    full = sim["masks"]
    return {
        "X": X,
        "A0": A0,
        "full_masks": full,
        "half_masks": np.ascontiguousarray(full[..., : D // 2 + 1]),
        "obs": bf.observed_sets(full),
    }


@pytest.fixture(scope="module")
def initial(data):
    """Brute-force E-step and statistics under the initial model (shared by all variants)."""
    model0 = bf.Model(data["A0"], np.full(K, 1.0 / K), NOISE, INIT_XI)
    e0 = bf.e_step(data["X"], data["obs"], model0, ROTATIONS, MAX_SHIFT)
    stats = bf.sufficient_statistics(data["X"], data["obs"], e0, ROTATIONS)
    # The data must make the test meaningful: posteriors neither delta nor flat.
    maxpost = e0["gamma"].reshape(N, -1).max(axis=1)
    assert e0["L"] == MAX_SHIFT
    assert maxpost.min() < 0.2 and maxpost.max() > 0.5, maxpost
    assert np.sum(maxpost < 0.99) >= N // 2, maxpost
    return {"model": model0, "e": e0, "stats": stats}


VARIANTS = {
    "impute": {"missing_data": "impute", "n_impute_iter": 1, "theta": None},
    "regularized": {"missing_data": "impute", "n_impute_iter": 1, "theta": 5.0},
    "weighted_average": {"missing_data": "weighted_average", "n_impute_iter": 1, "theta": None},
    "impute3": {"missing_data": "impute", "n_impute_iter": 3, "theta": None},
}


def _brute_iteration(data, initial, variant):
    cfg = VARIANTS[variant]
    e0 = initial["e"]
    model1, Ah1 = bf.m_step(
        initial["stats"],
        initial["model"],
        N,
        e0["n"].sum(),
        missing_data=cfg["missing_data"],
        n_impute_iter=cfg["n_impute_iter"],
        threshold=THRESHOLD,
        theta=cfg["theta"],
    )
    e1 = bf.e_step(data["X"], data["obs"], model1, ROTATIONS, MAX_SHIFT)
    return {"model": model1, "Ah": Ah1, "e": e1}


def _fit(data, variant):
    from mlsubtomo.estimator import MissingDataMLClassifier
    from mlsubtomo.regularization import Constant

    cfg = VARIANTS[variant]
    est = MissingDataMLClassifier(
        n_classes=K,
        rotations=ROTATIONS,
        max_shift=MAX_SHIFT,
        init_references=data["A0"],
        init_sigma=NOISE,
        init_xi=INIT_XI,
        max_iter=1,
        missing_data=cfg["missing_data"],
        n_impute_iter=cfg["n_impute_iter"],
        weighted_average_threshold=THRESHOLD,
        regularization=None if cfg["theta"] is None else Constant(cfg["theta"]),
        perturb=False,
        pruning_threshold=0.0,
        random_state=0,
        tol=0,
    )
    est.fit(data["X"], masks=data["half_masks"])
    return est


# --------------------------------------------------------------------- comparisons


def _rel_err(actual, expected):
    # complex128 keeps the imaginary part of Fourier components
    actual = np.asarray(actual).astype(np.complex128)
    expected = np.asarray(expected).astype(np.complex128)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _check_close(name, actual, expected, rtol=RTOL):
    err = _rel_err(actual, expected)
    assert err <= rtol, (
        f"{name}: relative error {err:.3e} > {rtol:g}\n  library={actual}\n  brute  ={expected}"
    )


def _check_elementwise(name, actual, expected, rtol=RTOL):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = np.abs(actual - expected) / np.abs(expected)
    assert err.max() <= rtol, (
        f"{name}: max elementwise relative error {err.max():.3e} > {rtol:g} "
        f"(at {int(err.argmax())})\n  library={actual}\n  brute  ={expected}"
    )


def _compare(est, data, initial, brute):
    e0, e1, model1 = initial["e"], brute["e"], brute["model"]
    in_band = bf.band(D)

    refs = np.asarray(est.references_)
    assert refs.shape == (K, D, D, D)
    refs_hat = bf.fftn(refs.astype(np.float64))
    for k in range(K):
        err = _rel_err(refs_hat[k][in_band], brute["Ah"][k][in_band])
        assert err <= RTOL, f"references_[{k}] on the band 0<|q|<r_max: relative error {err:.3e}"

    _check_close("class_weights_", est.class_weights_, model1.alpha)
    _check_close("sigma_", est.sigma_, model1.sigma)
    _check_close("xi_", est.xi_, model1.xi)

    hist = np.asarray(est.log_likelihood_history_, dtype=np.float64)
    assert hist.shape[0] >= 2, hist
    _check_close("log_likelihood_history_[0] (initial model)", hist[0], e0["l"].sum())
    _check_close("log_likelihood_history_[1] (after the M-step)", hist[1], e1["l"].sum())

    _check_elementwise("particle_log_likelihood_", est.particle_log_likelihood_, e1["l"])

    gamma = e1["gamma"].reshape(N, -1)
    _check_elementwise("max_posterior_", est.max_posterior_, gamma.max(axis=1))

    proba = bf.class_posteriors(e1)
    labels = proba.argmax(axis=1)
    # the data must leave no doubt about the best class, whichever way it is defined
    assert np.all(np.abs(proba[:, 0] - proba[:, 1]) > 1e-3), proba
    joint_best = [np.unravel_index(gamma[i].argmax(), e1["gamma"].shape[1:]) for i in range(N)]
    assert [b[0] for b in joint_best] == list(labels)
    np.testing.assert_array_equal(np.asarray(est.labels_), labels, err_msg="labels_")

    # best (R, t), for particles whose best hypothesis is clearly ahead of the next one
    top2 = np.sort(gamma, axis=1)[:, -2:]
    clear = top2[:, 1] > 1.01 * top2[:, 0]
    assert clear.sum() >= N // 2
    shifts = e1["shifts"]
    for i in np.flatnonzero(clear):
        _, r, j = joint_best[i]
        np.testing.assert_allclose(
            np.asarray(est.rotations_)[i], MATS[r], atol=1e-6, err_msg=f"rotations_[{i}]"
        )
        np.testing.assert_array_equal(
            np.asarray(est.shifts_)[i], shifts[j], err_msg=f"shifts_[{i}]"
        )

    p = np.asarray(est.predict_proba(data["X"], masks=data["half_masks"]), dtype=np.float64)
    assert p.shape == (N, K)
    err = np.abs(p - proba).max()
    assert err <= RTOL, f"predict_proba: max abs error {err:.3e}\n  library={p}\n  brute  ={proba}"


# --------------------------------------------------------------- library vs brute


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_iteration_matches_brute_force(variant, data, initial):
    brute = _brute_iteration(data, initial, variant)
    if variant == "impute":
        # the fitted model must still give a spread of posteriors
        maxpost = brute["e"]["gamma"].reshape(N, -1).max(axis=1)
        assert np.sum(maxpost < 0.99) >= 3, maxpost
    est = _fit(data, variant)
    _compare(est, data, initial, brute)


# --------------------------------------------------------- self-checks of the brute force


def test_brute_rotation_conventions():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((D, D, D))
    c = D // 2
    # a 90 degree turn about z takes the point c + x_hat to c + y_hat
    Rz = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    delta = np.zeros((D, D, D))
    delta[c, c, c + 1] = 1  # [z, y, x]
    out = bf.rotate(delta, Rz)
    assert out[c, c + 1, c] == 1 and out.sum() == 1
    # the cached index maps agree with the naive loop, composition is the matrix product
    rot = bf.Rotator(MATS, D)
    for r in range(0, len(MATS), 5):
        np.testing.assert_array_equal(rot.rotate(A, r), bf.rotate(A, MATS[r]))
    R1, R2 = MATS[3], MATS[17]
    np.testing.assert_array_equal(bf.rotate(bf.rotate(A, R2), R1), bf.rotate(A, R1 @ R2))
    np.testing.assert_array_equal(bf.rotate(bf.rotate(A, R1), R1.T), A)
    # Fourier side: (R A)^(q) = exp(-2 pi i q.(c - R c)/D) A^(R^T q)
    qx, qy, qz = bf.frequencies(D)
    cvec = np.full(3, c)
    for R in MATS[::4]:
        lhs = bf.fftn(bf.rotate(A, R))
        s = cvec - R @ cvec
        phase = np.exp(-2j * np.pi * (qx * s[0] + qy * s[1] + qz * s[2]) / D)
        Ahat_RTq = bf.rotate_fourier_mask(bf.fftn(A), R.T)  # A^(R^T q)
        np.testing.assert_allclose(lhs, phase * Ahat_RTq, atol=1e-10)
    # shift: (S_t V)^(q) = exp(-2 pi i q.t / D) V^(q)
    t = np.array([1, -2, 3])
    phase = np.exp(-2j * np.pi * (qx * t[0] + qy * t[1] + qz * t[2]) / D)
    np.testing.assert_allclose(bf.fftn(bf.shift(A, t)), phase * bf.fftn(A), atol=1e-10)
    # masks and volumes rotate consistently: R^-1 (w V) = (R^-1 w)(R^-1 V)
    w = rng.random((D, D, D)) < 0.5
    w = w | bf.hermitian_partner(w)
    for R in MATS[::6]:
        lhs = bf.rotate(bf.ifftn_real(bf.fftn(A) * w), R.T)
        rhs = bf.ifftn_real(bf.fftn(bf.rotate(A, R.T)) * bf.rotate_fourier_mask(w, R))
        np.testing.assert_allclose(lhs, rhs, atol=1e-10)


def test_brute_noise_free_concentrates_on_truth():
    sim = _simulate(seed=5, noise=0.0)
    obs = bf.observed_sets(sim["masks"])
    sigma = 1e-3
    model = bf.Model(sim["A"], np.full(K, 1.0 / K), sigma, INIT_XI)
    e = bf.e_step(sim["X"], obs, model, ROTATIONS, MAX_SHIFT)
    shifts = e["shifts"]
    for i in range(N):
        j = int(np.flatnonzero((shifts == sim["ts"][i]).all(axis=1))[0])
        assert e["d"][i, sim["ks"][i], sim["rs"][i], j] < 1e-20
        assert e["gamma"][i, sim["ks"][i], sim["rs"][i], j] > 1 - 1e-9
    np.testing.assert_allclose(e["gamma"].sum(axis=(1, 2, 3)), 1.0)
    stats = bf.sufficient_statistics(sim["X"], obs, e, ROTATIONS)
    assert stats["D_sigma"] < 1e-15
    np.testing.assert_allclose(stats["S"], [N / K] * K)
    expected_xi2 = np.sum(sim["ts"] ** 2) / (3 * N)
    np.testing.assert_allclose(stats["D_xi"] / (3 * N), expected_xi2, rtol=1e-9)

    # with the true references the impute M-step is a fixed point on the band,
    # and sigma^2 shrinks by the observed fraction
    in_band = bf.band(D)
    n_sum = e["n"].sum()
    J = int(in_band.sum())
    model1, Ah = bf.m_step(stats, model, N, n_sum)
    Atrue = bf.fftn(sim["A"])
    for k in range(K):
        np.testing.assert_allclose(Ah[k][in_band], Atrue[k][in_band], atol=1e-10)
    np.testing.assert_allclose(model1.sigma**2, sigma**2 * (N * J - n_sum) / (N * J), rtol=1e-6)
    np.testing.assert_allclose(model1.alpha, [1 / K] * K)

    # weighted averaging recovers the truth wherever some particle observed it
    _, Ah_wa = bf.m_step(stats, model, N, n_sum, missing_data="weighted_average")
    for k in range(K):
        seen = in_band & (stats["W"][k] > THRESHOLD)
        assert seen.sum() > 0.9 * in_band.sum()
        np.testing.assert_allclose(Ah_wa[k][seen], Atrue[k][seen], atol=1e-10)
        assert np.all(Ah_wa[k][~seen] == 0)

    # regularisation with equal classes changes nothing
    same = dict(
        stats, B=np.repeat(stats["B"][:1], K, axis=0), W=np.repeat(stats["W"][:1], K, axis=0)
    )
    model_same = bf.Model(np.repeat(sim["A"][:1], K, axis=0), model.alpha, sigma, INIT_XI)
    m_ml, Ah_ml = bf.m_step(same, model_same, N, n_sum)
    m_reg, Ah_reg = bf.m_step(same, model_same, N, n_sum, theta=5.0)
    np.testing.assert_allclose(Ah_reg, Ah_ml, atol=1e-10)
    np.testing.assert_allclose(m_reg.sigma, m_ml.sigma, rtol=1e-12)


def test_brute_regularisation_solves_stationarity(data, initial):
    """The regularised update satisfies S_k (A_k - A_k^ML) + tau (K A_k - sum_l A_l) = 0."""
    theta = 5.0
    n_sum = initial["e"]["n"].sum()
    m_ml, Ah_ml = bf.m_step(initial["stats"], initial["model"], N, n_sum)
    m_reg, Ah_reg = bf.m_step(initial["stats"], initial["model"], N, n_sum, theta=theta)
    S = initial["stats"]["S"]
    tau = theta * N / K
    for k in range(K):
        res = S[k] * (Ah_reg[k] - Ah_ml[k]) + tau * (K * Ah_reg[k] - Ah_reg.sum(axis=0))
        assert np.abs(res).max() < 1e-9 * np.abs(Ah_ml).max()
    in_band = bf.band(D)
    pen = sum(
        np.sum(np.abs(Ah_reg[k] - Ah_reg[m])[in_band] ** 2) for k in range(K) for m in range(K)
    )
    J = int(in_band.sum())
    np.testing.assert_allclose(m_reg.sigma**2 - m_ml.sigma**2, tau * pen / (2 * N * J), rtol=1e-10)
    assert pen > 0

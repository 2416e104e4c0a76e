"""Tests of mlsubtomo.transform against explicit matrices and index arithmetic."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mlsubtomo.transform import (
    centre_for_fft,
    euler_from_matrix,
    matrix_from_euler,
    outside_value,
    rotate_centred,
    rotate_volume,
    shift_volume,
    uncentre_from_fft,
)

CUBE_FLOAT = Rotation.create_group("O").as_matrix()  # the 24 of the cube, with round-off
CUBE = np.rint(CUBE_FLOAT).astype(int)


def _relion_matrix(rot, tilt, psi):
    """RELION/Xmipp Euler matrix E(rot, tilt, psi), written out (angles in degrees)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )


def _random_angles(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)]
    )


def _rotate_by_index(volume, matrix):
    """out[r] = V[R^T (r - c) + c] by integer index arithmetic (cube rotations only);
    sources outside the box give the boundary mean."""
    d = volume.shape[0]
    c = d // 2
    rt = np.rint(np.asarray(matrix).T).astype(int)
    out = np.empty_like(volume)
    for z in range(d):
        for y in range(d):
            for x in range(d):
                source = rt @ np.array([x - c, y - c, z - c]) + c
                inside = np.all((source >= 0) & (source < d))
                sx, sy, sz = source
                out[z, y, x] = volume[sz, sy, sx] if inside else _boundary_mean(volume)
    return out


def _boundary_mean(volume):
    """The mean of the voxels on the six faces of the box, written out."""
    d = volume.shape[0]
    faces = [
        volume[i, j, k] for i in range(d) for j in range(d) for k in range(d)
        if {i, j, k} & {0, d - 1}
    ]
    return np.mean(faces)


def _blob(d, position, sigma=1.0):
    """Gaussian blob centred at voxel coordinates ``position = (x, y, z)``."""
    r = np.arange(d, dtype=np.float64)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    px, py, pz = position
    return np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * sigma**2))


def _centre_of_mass(volume, radius=None):
    """(x, y, z) centre of mass in voxel coordinates, optionally within a ball.

    The ball of the given radius about the rotation centre is where a rotation keeps
    all its content: outside it, ``rotate_volume`` fills the corners with the
    boundary mean.
    """
    if radius is not None:
        volume = volume * (_radius(volume.shape[-1]) < radius)
    cz, cy, cx = ndimage.center_of_mass(volume)
    return np.array([cx, cy, cz])


def _radius(d):
    r = np.arange(d) - d // 2
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2)


def _corr(a, b):
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# --- Euler angles ------------------------------------------------------------------


def test_matrix_from_euler_is_transpose_of_relion_matrix():
    angles = _random_angles(20)
    matrices = matrix_from_euler(angles)
    assert matrices.shape == (20, 3, 3)
    for a, R in zip(angles, matrices, strict=True):
        np.testing.assert_allclose(R, _relion_matrix(*a).T, atol=1e-12)
        np.testing.assert_allclose(matrix_from_euler(a), R, atol=1e-12)


def test_matrix_from_euler_special_angles():
    for a in [(0, 0, 0), (90, 0, 0), (0, 90, 0), (0, 0, 90), (30, 180, -45), (-120, 0, 60)]:
        np.testing.assert_allclose(matrix_from_euler(a), _relion_matrix(*a).T, atol=1e-12)
    # rot = 90 alone turns x into y
    np.testing.assert_allclose(matrix_from_euler((90, 0, 0)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


@pytest.mark.filterwarnings("ignore:Gimbal lock")
def test_euler_round_trip():
    angles = _random_angles(50, seed=1)
    back = euler_from_matrix(matrix_from_euler(angles))
    assert back.shape == (50, 3)
    assert np.all((back[:, 1] >= 0) & (back[:, 1] <= 180))
    np.testing.assert_allclose(matrix_from_euler(back), matrix_from_euler(angles), atol=1e-10)
    for R in CUBE:
        np.testing.assert_allclose(matrix_from_euler(euler_from_matrix(R)), R, atol=1e-10)


# --- rotate_volume -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Gimbal lock")
@pytest.mark.parametrize("d", (9, 8))
@pytest.mark.parametrize("order", (1, 3))
def test_cube_rotations_match_index_arithmetic(d, order):
    assert len(CUBE) == 24
    volume = np.random.default_rng(2).standard_normal((d, d, d)).astype(np.float32)
    for R, R_float in zip(CUBE, CUBE_FLOAT, strict=True):
        expected = _rotate_by_index(volume, R)
        # matrices as they come out of scipy or Euler angles, not exactly integer
        for matrix in (R, R_float, matrix_from_euler(euler_from_matrix(R_float))):
            rotated = rotate_volume(volume, matrix, order=order)
            assert rotated.dtype == np.float32
            np.testing.assert_allclose(rotated, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", (1, 3))
def test_identity_rotation_returns_input(order):
    volume = np.random.default_rng(3).standard_normal((9, 9, 9))
    np.testing.assert_allclose(rotate_volume(volume, np.eye(3), order=order), volume, atol=1e-12)


def test_rotation_about_z_moves_blob_to_r_times_position():
    d = 24
    c = d // 2
    p = np.array([3.0, 1.0, -2.0])  # (x, y, z) relative to the centre
    R = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 degrees about z
    np.testing.assert_allclose(R @ p, [-1.0, 3.0, -2.0])
    rotated = rotate_volume(_blob(d, p + c), R)
    np.testing.assert_allclose(_centre_of_mass(rotated) - c, [-1.0, 3.0, -2.0], atol=1e-6)
    np.testing.assert_allclose(matrix_from_euler((90, 0, 0)), R, atol=1e-12)


@pytest.mark.parametrize("order", (1, 3))
@pytest.mark.parametrize("seed", range(3))
def test_general_rotation_moves_blob_to_r_times_position(seed, order):
    d = 24
    c = d // 2
    p = np.array([4.0, -3.0, 2.5])
    R = Rotation.random(random_state=seed).as_matrix()
    rotated = rotate_volume(_blob(d, p + c, sigma=1.5), R, order=order)
    np.testing.assert_allclose(_centre_of_mass(rotated, radius=c) - c, R @ p, atol=0.02)


@pytest.mark.parametrize("d", (9, 8))
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_trilinear_equals_scipy_affine_transform(d, dtype):
    """The compiled order-1 rotation is scipy's trilinear one, about the same centre."""
    volume = np.random.default_rng(6).standard_normal((d, d, d)).astype(dtype)
    c = float(d // 2)
    for seed in range(5):
        R = Rotation.random(random_state=seed).as_matrix()
        m = R.T[::-1, ::-1]
        expected = ndimage.affine_transform(
            volume, m, offset=c - m.sum(axis=1) * c, order=1, mode="grid-constant",
            cval=_boundary_mean(volume),
        )
        rotated = rotate_volume(volume, R, order=1)
        assert rotated.dtype == dtype
        np.testing.assert_allclose(rotated, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", (1, 3))
def test_rotate_centred_rotates_each_volume_of_a_stack(order):
    stack = np.random.default_rng(7).standard_normal((2, 3, 8, 8, 8)).astype(np.float32)
    R = Rotation.random(random_state=8).as_matrix()
    rotated = rotate_centred(centre_for_fft(stack), R, order=order)
    assert rotated.shape == stack.shape and rotated.dtype == np.float32
    for index in np.ndindex(2, 3):
        np.testing.assert_allclose(
            uncentre_from_fft(rotated[index]), rotate_volume(stack[index], R, order=order),
            rtol=0, atol=1e-6,
        )


@pytest.mark.parametrize("order", (1, 3))
def test_content_leaving_the_box_does_not_wrap_around(order):
    # A blob turned 45 degrees about z to the edge of the box at y = D - 1: what
    # leaves the box must not come back in at y = 0 (xmipp's DONT_WRAP). Wrapped, about
    # 0.65 would; the boundary mean there is about 1e-3.
    d = 16
    c = d // 2
    blob = _blob(d, (c + 5, c + 5, c), sigma=1.0)
    R = Rotation.from_euler("z", 45, degrees=True).as_matrix()
    rotated = rotate_volume(blob, R, order=order)
    assert rotated[c, d - 1, c] > 0.3
    assert np.abs(rotated[:, :3, :]).max() < 0.05


def test_outside_value_is_the_boundary_mean_in_either_layout():
    volumes = np.random.default_rng(9).standard_normal((2, 7, 7, 7))
    expected = [_boundary_mean(v) for v in volumes]
    np.testing.assert_allclose(outside_value(volumes), expected, rtol=1e-12)
    np.testing.assert_allclose(
        outside_value(centre_for_fft(volumes), centred=True), expected, rtol=1e-12
    )


def test_rotation_and_inverse_recover_smooth_volume():
    d = 32
    rng = np.random.default_rng(4)
    smooth = ndimage.gaussian_filter(rng.standard_normal((d, d, d)), 2.0, mode="wrap")
    radius = _radius(d)
    volume = (smooth * 0.5 * (1 - np.tanh(radius - (d // 2 - 4)))).astype(np.float32)
    R = matrix_from_euler((37.0, 71.0, -122.0))
    back = rotate_volume(rotate_volume(volume, R, order=3), R.T, order=3)
    assert back.dtype == np.float32
    # Within the inscribed ball nothing leaves the box, so the content must come back.
    # (The corners of `back` hold the boundary mean, as documented.)
    inside = radius < d // 2
    assert _corr(back[inside], volume[inside]) > 0.99
    np.testing.assert_allclose(back[radius < d // 2 - 2], volume[radius < d // 2 - 2], atol=0.02)


# --- Fourier property --------------------------------------------------------------


@pytest.mark.parametrize("d", (9, 7))
def test_rotation_rotates_transform_of_centred_volume(d):
    """fftn(centre_for_fft(R V))(q) = fftn(centre_for_fft(V))(R^T q) on the full grid.

    Odd boxes only: an even box is not symmetric about voxel D//2, so a cube rotation
    moves its face at -D/2 out of the box (and takes the boundary mean in)."""
    volume = np.random.default_rng(5).standard_normal((d, d, d))
    F0 = np.fft.fftn(centre_for_fft(volume), norm="ortho")
    f = np.rint(np.fft.fftfreq(d) * d).astype(int)
    qz, qy, qx = np.meshgrid(f, f, f, indexing="ij")
    q = np.stack([qx.ravel(), qy.ravel(), qz.ravel()])  # (x, y, z) frequencies
    for R in CUBE:
        F1 = np.fft.fftn(centre_for_fft(rotate_volume(volume, R)), norm="ortho")
        sx, sy, sz = (R.T @ q) % d
        expected = F0[sz, sy, sx].reshape(d, d, d)
        np.testing.assert_allclose(F1, expected, rtol=0, atol=1e-10 * np.abs(F0).max())


def test_centre_for_fft_moves_centre_to_origin():
    for d in (8, 9):
        volume = np.zeros((2, d, d, d))
        volume[:, d // 2, d // 2, d // 2] = 1.0
        centred = centre_for_fft(volume)
        assert np.all(centred[:, 0, 0, 0] == 1.0)
        np.testing.assert_array_equal(uncentre_from_fft(centred), volume)


# --- shift_volume ------------------------------------------------------------------


@pytest.mark.parametrize("t", [(2, -1, 3), (0, 0, 0), (-4, 5, 1), (1.0, 2.0, -3.0)])
def test_shift_moves_blob(t):
    d = 24
    p = np.array([11.0, 9.0, 13.0])  # (x, y, z)
    shifted = shift_volume(_blob(d, p), t)
    np.testing.assert_allclose(_centre_of_mass(shifted), p + np.asarray(t), atol=1e-6)
    np.testing.assert_allclose(shifted, _blob(d, p + np.asarray(t)), atol=1e-12)


def test_shift_wraps_circularly():
    d = 8
    volume = np.zeros((d, d, d))
    x, y, z = 6, 1, 3
    volume[z, y, x] = 1.0
    shifted = shift_volume(volume, (3, -2, 5))
    assert shifted[(z + 5) % d, (y - 2) % d, (x + 3) % d] == 1.0
    assert shifted.sum() == 1.0


@pytest.mark.parametrize("t", [(0.5, 0, 0), (1, 2.2, 3), (1, 2), (1, 2, 3, 4)])
def test_shift_rejects_non_integer_or_wrong_length(t):
    with pytest.raises(ValueError, match="shift"):
        shift_volume(np.zeros((8, 8, 8)), t)

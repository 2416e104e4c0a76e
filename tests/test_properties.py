"""Property-based tests (hypothesis) of the masks, the SO(3) grid, the FFTs and the
sufficient statistics, over randomly drawn geometries, rotations, sizes and chunks.

The examples are derandomised so that every run tests the same cases.
"""

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from mlsubtomo.fft import BACKENDS, FFTBackend, half_grid_shape
from mlsubtomo.masks import ArrayMask, Mask, MissingCone, MissingPyramid, MissingWedge
from mlsubtomo.sampling import covering_radius, so3_grid, symmetry_group
from mlsubtomo.stats import SufficientStatistics

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None)

seeds = st.integers(0, 2**32 - 1)
boxes = st.integers(2, 14)
resolutions = st.one_of(st.none(), st.floats(0.05, 0.86))


@st.composite
def tilt_ranges(draw):
    low = draw(st.floats(-90, 90, exclude_max=True))
    return low, draw(st.floats(low, 90, exclude_min=True))


@st.composite
def geometric_masks(draw):
    kind = draw(st.sampled_from(["wedge", "pyramid", "cone"]))
    if kind == "wedge":
        return MissingWedge(*draw(tilt_ranges()), axis=draw(st.sampled_from(["x", "y"])))
    if kind == "pyramid":
        return MissingPyramid(*draw(tilt_ranges()), *draw(tilt_ranges()))
    return MissingCone(draw(st.floats(0, 90, exclude_min=True)))


@st.composite
def masks_with_boxes(draw):
    """A geometric mask or a random boolean half grid, with a box size it fits."""
    d = draw(boxes)
    if draw(st.booleans()):
        return draw(geometric_masks()), d
    rng = np.random.default_rng(draw(seeds))
    return ArrayMask(rng.random(half_grid_shape(d)) < draw(st.floats(0, 1))), d


@st.composite
def symmetries(draw):
    return f"{draw(st.sampled_from(['C', 'D']))}{draw(st.integers(1, 8))}"


# ------------------------------------------------------------------------- masks


@PROPERTY
@given(mask_and_box=masks_with_boxes(), seed=seeds, max_resolution=resolutions)
def test_observed_sets_are_hermitian(mask_and_box, seed, max_resolution):
    # On the half grid only the kx = 0 plane (and kx = D/2 for even D) holds both q
    # and -q; there w(q) = w(-q) must hold entry by entry, rotated or not.
    mask, d = mask_and_box
    stack = np.concatenate([
        mask.observed(d, max_resolution=max_resolution)[None],
        mask.observed(d, rotation=Rotation.random(3, random_state=seed),
                      max_resolution=max_resolution),
    ])
    neg = (-np.arange(d)) % d
    for kx in [0] + ([d // 2] if d % 2 == 0 else []):
        plane = stack[..., kx]
        np.testing.assert_array_equal(plane, plane[:, neg][:, :, neg])
    assert not stack[:, 0, 0, 0].any()  # DC


class _Turned(Mask):
    """``base`` rotated by ``matrix``, as a geometry of its own: p observed iff base at R^T p."""

    def __init__(self, base, matrix):
        self.base = base
        self.matrix = matrix

    def _criterion(self, x, y, z, box_size):
        p = np.einsum("ji,j...->i...", self.matrix, np.stack(np.broadcast_arrays(x, y, z)))
        return self.base._criterion(p[0], p[1], p[2], box_size)

    def _params(self):
        return {"base": self.base, "matrix": self.matrix.tobytes()}


@PROPERTY
@given(mask=geometric_masks(), d=boxes, pair=st.tuples(seeds, seeds), max_resolution=resolutions)
def test_rotating_by_r1_then_r2_is_rotating_by_r2_r1(mask, d, pair, max_resolution):
    # observed(rotation=R) describes the particle rotated by R, w_R(q) = w(R^T q), so
    # turning the rotated geometry by R2 gives w(R1^T R2^T q) = w((R2 R1)^T q).
    # Generic rotations put no lattice point on a boundary, so rounding cannot flip one.
    r1, r2 = (Rotation.random(random_state=s).as_matrix() for s in pair)
    once = mask.observed(d, rotation=r2 @ r1, max_resolution=max_resolution)
    twice = _Turned(mask, r1).observed(d, rotation=r2, max_resolution=max_resolution)
    np.testing.assert_array_equal(twice, once)


# ---------------------------------------------------------------------- sampling


@PROPERTY
@given(step=st.floats(20, 120), symmetry=symmetries(), seed=seeds)
def test_random_rotations_lie_within_the_step_of_the_grid(step, symmetry, seed):
    grid = so3_grid(step, symmetry)
    probes = Rotation.random(30, random_state=seed)
    group = symmetry_group(symmetry)
    # Distances modulo G by brute force: the angle of probe^-1 grid_j g, over j and g.
    expanded = Rotation.concatenate([grid * group[i] for i in range(len(group))])
    distances = np.degrees([(probe.inv() * expanded).magnitude().min() for probe in probes])
    assert distances.max() <= step + 1e-9
    assert abs(covering_radius(grid, probes, symmetry) - distances.max()) < 1e-6


# --------------------------------------------------------------------------- fft


@PROPERTY
@given(
    backend=st.sampled_from(BACKENDS),
    d=st.integers(2, 17),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=seeds,
)
def test_fft_matches_numpy_and_round_trips(backend, d, batch, seed):
    x = np.random.default_rng(seed).normal(size=(*batch, d, d, d)).astype(np.float32)
    original = x.copy()
    fft = FFTBackend(backend)
    spectrum = fft.rfftn(x)
    expected = np.fft.rfftn(x.astype(np.float64), axes=(-3, -2, -1), norm="ortho")
    assert spectrum.shape == expected.shape and spectrum.dtype == np.complex64
    np.testing.assert_allclose(spectrum, expected, atol=1e-5 * np.abs(expected).max())
    back = fft.irfftn(spectrum, d)
    assert back.shape == x.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, x, atol=1e-5 * np.abs(x).max())
    np.testing.assert_array_equal(x, original)


# ------------------------------------------------------------------------- stats


def _random_statistics(rng, n_classes, half_shape):
    scale = 10.0 ** rng.uniform(-3, 3)  # chunks of very different size
    shape = (n_classes, *half_shape)
    return SufficientStatistics(
        class_sums=scale * rng.random(n_classes),
        data_sums=scale * (rng.normal(size=shape) + 1j * rng.normal(size=shape)),
        observation_counts=scale * rng.random(shape),
        residual_sum=scale * rng.random(),
        shift_sum=scale * rng.random(),
        log_likelihood=-scale * rng.random(),
        n_observed=float(rng.integers(1, 1000)),
        n_particles=int(rng.integers(1, 50)),
    )


def _assert_close(total, chunks, reference):
    """Every field equal to ``reference``, within rounding of sums of ``chunks``."""
    for field in dataclasses.fields(SufficientStatistics):
        got, want = getattr(total, field.name), getattr(reference, field.name)
        if field.name == "n_particles":
            assert got == want
            continue
        size = sum(np.abs(getattr(c, field.name)) for c in chunks)
        tolerance = 1e-12 * np.max(size)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=field.name)


@PROPERTY
@given(
    n_classes=st.integers(1, 3),
    d=st.integers(2, 5),
    n_chunks=st.integers(1, 6),
    seed=seeds,
    data=st.data(),
)
def test_statistics_add_up_in_any_order_and_grouping(n_classes, d, n_chunks, seed, data):
    rng = np.random.default_rng(seed)
    half_shape = half_grid_shape(d)
    chunks = [_random_statistics(rng, n_classes, half_shape) for _ in range(n_chunks)]
    # The reference: each field summed directly over the chunks.
    reference = SufficientStatistics(**{
        f.name: np.sum([getattr(c, f.name) for c in chunks], axis=0)
        for f in dataclasses.fields(SufficientStatistics)
    })
    order = data.draw(st.permutations(range(n_chunks)))
    split = data.draw(st.integers(0, n_chunks))
    shuffled = [chunks[i] for i in order]
    # Starting each partial sum from empty statistics also checks that they add nothing.
    empty = SufficientStatistics.zeros(n_classes, half_shape)
    grouped = sum(shuffled[:split], empty) + sum(shuffled[split:], empty)
    for total in (sum(chunks), sum(shuffled), grouped):
        _assert_close(total, chunks, reference)

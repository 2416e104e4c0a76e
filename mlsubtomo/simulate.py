"""Phantoms and simulated subtomogram sets (missing data, noise, preferred orientation).

The simulated particle ``i`` of class ``k`` follows the model of the design
conventions: ``Y_i(r) = A_k(R_i^T (r - t_i)) + n_i(r)`` with white Gaussian noise
``n_i``, after which the part of Fourier space its mask does not observe is set
to zero, ``X_i = irfftn(rfftn(Y_i) * mask_i.observed(D))``. The mask is fixed in
the microscope frame (the particle's own frame); the reference is what rotates.

The two phantoms are built from anisotropic Gaussian blobs placed with the
geometry of the chaperonin GroEL (a D7 double ring) and of GroEL with a GroES
cap (C7 only), so that two classes differ clearly at low resolution while each
has enough chiral detail for orientations to be found.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from scipy.spatial.transform import Rotation
from sklearn.utils import check_random_state

from .fft import FFTBackend, frequency_grid, half_grid_shape
from .transform import euler_from_matrix, rotate_volume, shift_volume

__all__ = [
    "SimulatedDataset",
    "demo_dataset",
    "density_from_pdb",
    "groel_groes_phantom",
    "groel_phantom",
    "lowpass",
    "make_dataset",
]

# Spline order used to rotate the references when simulating. Cubic splines
# approximate the rotation of the underlying continuous (band-limited) map more
# closely than trilinear interpolation, so that the simulated particles are not
# systematically smoother than the references; the estimator's own default
# (trilinear) is then an approximation of the truth, as with real data.
INTERPOLATION_ORDER = 3

# Particles per batch of Fourier masking: bounds the memory of the temporary
# stacks for large boxes while keeping the FFT calls batched.
_CHUNK = 64

# ---------------------------------------------------------------------------
# Phantom geometry, in Angstrom, for the subunit of the upper ring (z > 0).
# Each blob is (radius, azimuth in degrees, height, sigma along the radial,
# tangential and axial directions, tilt in degrees of the tangential-axial pair
# about the radial direction, peak density before filtering). The azimuth grows
# with height and the blobs are tilted, so the subunit twists: a ring has no
# mirror plane (it is chiral), which helps the orientation search. The lower ring
# is the image of the upper one under the two-fold about x, (x, y, z) ->
# (x, -y, -z), so the double ring is D7. Envelope: about 146 A tall, 137 A wide,
# a central channel about 45-60 A across.
# ---------------------------------------------------------------------------
_GROEL_SUBUNIT = (
    # equatorial domain: the bulk of the mass, next to the ring-ring contact
    (49.0, 0.0, 17.0, 10.0, 13.0, 10.0, 0.0, 1.0),
    # equatorial stem loop reaching towards the other ring
    (56.0, 12.0, 4.0, 6.0, 7.0, 5.0, 0.0, 0.6),
    # intermediate domain: a thin hinge on the outside of the barrel
    (56.0, 14.0, 38.0, 7.0, 8.0, 9.0, 20.0, 0.6),
    # apical domain, tilted and twisted further round
    (48.0, 26.0, 56.0, 10.0, 12.0, 8.0, 30.0, 0.9),
    # apical helices lining the channel entrance
    (32.0, 34.0, 62.0, 5.0, 7.0, 5.0, 0.0, 0.6),
)

# GroES subunit of the cap on the +z end: a heptameric dome about 78 A wide and
# 30 A tall whose mobile loops rest on the apical domains of the upper ring.
_GROES_SUBUNIT = (
    # dome wall (beta barrel core)
    (27.0, 10.0, 78.0, 9.0, 11.0, 8.0, 25.0, 0.7),
    # mobile loop contacting the apical domain below
    (35.0, 30.0, 68.0, 5.0, 6.0, 4.0, 0.0, 0.5),
    # roof hairpin closing the top of the dome
    (12.0, 40.0, 87.0, 7.0, 8.0, 5.0, 0.0, 0.5),
)

_N_FOLD = 7


@dataclass
class SimulatedDataset:
    """A simulated set of subtomograms with its ground truth.

    Attributes
    ----------
    volumes : ndarray of shape (N, D, D, D)
        The particles ``X_i`` (noisy, missing region zeroed), indexed ``[z, y, x]``.
    masks : mask object, list of N mask objects, ndarray or None
        The missing-data geometry used: what was passed to :func:`make_dataset`
        (None: no Fourier masking at all).
    labels : ndarray of shape (N,), int
        True class of each particle (index into ``references``).
    rotations : ndarray of shape (N, 3, 3), float64
        True rotations: ``X_i(r) = A_k(R_i^T (r - t_i)) + noise``.
    shifts : ndarray of shape (N, 3), int
        True integer shifts ``t_i`` as ``(x, y, z)`` voxels.
    references : ndarray of shape (K, D, D, D)
        The clean references ``A_k``.
    snr : float
        The requested signal-to-noise ratio (``np.inf``: no noise).
    noise_std : ndarray of shape (N,), float64
        Per-voxel real-space noise standard deviation of each particle, before
        masking.
    max_shift : int
        Half-width of the cube the shifts were drawn from (a natural search range).
    voxel_size : float
        Voxel size in Angstrom (metadata, e.g. for writing maps).
    """

    volumes: np.ndarray
    masks: object
    labels: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    references: np.ndarray
    snr: float
    noise_std: np.ndarray
    max_shift: int = 0
    voxel_size: float = 1.0

    @property
    def euler_angles(self) -> np.ndarray:
        """True orientations as ZYZ (rot, tilt, psi) in degrees, RELION's convention.

        Returns
        -------
        ndarray of shape (N, 3)
        """
        return euler_from_matrix(self.rotations)

    def __len__(self) -> int:
        return len(self.volumes)


# ---------------------------------------------------------------------------
# Phantoms
# ---------------------------------------------------------------------------


def groel_phantom(box_size=32, voxel_size=10.0, resolution=25.0) -> np.ndarray:
    """A GroEL-like double-ring barrel (point group D7), low-passed.

    Two stacked rings of seven subunits with an open central channel, about
    146 A tall and 137 A wide. Each subunit is a few Gaussian blobs (equatorial,
    intermediate and apical domain masses) twisted and tilted so that a ring is
    chiral; the rings are related by a two-fold about x.

    Parameters
    ----------
    box_size : int, default=32
        Side D of the cubic box in voxels.
    voxel_size : float, default=10.0
        Voxel size in Angstrom.
    resolution : float, default=25.0
        Resolution in Angstrom: the Gaussian low-pass has transfer 1/2 at
        spatial frequency ``1 / resolution``. At least two voxels (Nyquist).

    Returns
    -------
    ndarray of shape (D, D, D), float32
        Indexed ``[z, y, x]``, centred on voxel ``D//2``, symmetry axis z. Scaled
        so that the maximum of the GroEL barrel at these parameters is 1.

    Raises
    ------
    ValueError
        If an argument is invalid or the particle does not fit in the box.

    Examples
    --------
    >>> from mlsubtomo.simulate import groel_phantom
    >>> groel_phantom(24, voxel_size=10.0).shape
    (24, 24, 24)
    """
    return _phantom(box_size, voxel_size, resolution, with_groes=False)


def groel_groes_phantom(box_size=32, voxel_size=10.0, resolution=25.0) -> np.ndarray:
    """The GroEL-like barrel of :func:`groel_phantom` capped by a GroES-like dome.

    The heptameric dome (about 78 A wide and 30 A tall) sits on the +z end, so the
    complex is C7 only and, at low resolution, clearly different from the barrel
    alone (its channel is closed at one end and it has more mass at +z).

    Parameters
    ----------
    box_size : int, default=32
        Side D of the cubic box in voxels.
    voxel_size : float, default=10.0
        Voxel size in Angstrom.
    resolution : float, default=25.0
        Resolution in Angstrom (transfer 1/2 of the Gaussian low-pass at
        ``1 / resolution``).

    Returns
    -------
    ndarray of shape (D, D, D), float32
        Indexed ``[z, y, x]``, the barrel centred on voxel ``D//2``. Scaled with the
        same factor as :func:`groel_phantom` at the same parameters, so the two
        barrels have identical density and differ only by the cap.

    Raises
    ------
    ValueError
        If an argument is invalid or the particle does not fit in the box.
    """
    return _phantom(box_size, voxel_size, resolution, with_groes=True)


def _phantom(box_size, voxel_size, resolution, with_groes: bool) -> np.ndarray:
    d = _check_int("box_size", box_size, minimum=2)
    voxel_size = _check_positive("voxel_size", voxel_size)
    resolution = _check_positive("resolution", resolution)
    if resolution < 2.0 * voxel_size:
        raise ValueError(
            f"resolution must be at least 2 * voxel_size (Nyquist), got resolution="
            f"{resolution} with voxel_size={voxel_size}"
        )
    barrel = _ring_blobs(_GROEL_SUBUNIT, double=True)
    blobs = barrel + (_ring_blobs(_GROES_SUBUNIT, double=False) if with_groes else [])

    # The particle must fit in the box in every orientation: its bounding sphere
    # (each blob reaching two standard deviations beyond its centre, away from the
    # box centre) must lie inside the largest sphere about voxel D//2 that stays
    # within the box on its shorter side.
    extent = max(_reach(c, s) for c, s, _ in blobs)
    room = ((d - 1) // 2) * voxel_size
    if extent > room:
        raise ValueError(
            f"the particle (radius {extent:.0f} A) does not fit in a box of box_size={d} "
            f"voxels of voxel_size={voxel_size} A (room for a radius of {room:.0f} A); "
            "increase box_size or voxel_size"
        )

    # The low-pass is applied analytically: a Gaussian filter of transfer
    # exp(-2 pi^2 s^2 f^2) = 1/2 at f = 1/resolution is a real-space Gaussian of
    # variance s^2, which adds to each blob's covariance. Sampling the filtered
    # continuous map keeps it exactly C7 (D7), with no grid-dependent blur.
    s2 = np.log(2.0) / (2.0 * np.pi**2) * resolution**2
    volume = _render(blobs, d, voxel_size, s2)
    scale = _render(barrel, d, voxel_size, s2).max() if with_groes else volume.max()
    return (volume / scale).astype(np.float32)


def _reach(centre: np.ndarray, cov: np.ndarray) -> float:
    """Distance from the origin to a blob's centre plus two standard deviations outwards."""
    dist = float(np.linalg.norm(centre))
    if dist == 0.0:
        return 2.0 * float(np.sqrt(np.linalg.eigvalsh(cov).max()))
    u = centre / dist
    return dist + 2.0 * float(np.sqrt(u @ cov @ u))


def _ring_blobs(subunit, double: bool) -> list:
    """Blobs ``(centre, covariance, peak)`` of a heptameric ring (or D7 double ring)."""
    flip = np.diag([1.0, -1.0, -1.0])  # the two-fold about x relating the rings
    blobs = []
    for j in range(_N_FOLD):
        for r, azimuth, z, s_rad, s_tan, s_ax, tilt, peak in subunit:
            phi = np.deg2rad(360.0 * j / _N_FOLD + azimuth)
            t = np.deg2rad(tilt)
            radial = np.array([np.cos(phi), np.sin(phi), 0.0])
            tangential = np.array([-np.sin(phi), np.cos(phi), 0.0])
            axial = np.array([0.0, 0.0, 1.0])
            frame = np.stack(
                [
                    radial,
                    np.cos(t) * tangential + np.sin(t) * axial,
                    -np.sin(t) * tangential + np.cos(t) * axial,
                ],
                axis=1,
            )
            centre = r * radial + z * axial
            cov = frame @ np.diag([s_rad**2, s_tan**2, s_ax**2]) @ frame.T
            blobs.append((centre, cov, peak))
            if double:
                blobs.append((flip @ centre, flip @ cov @ flip.T, peak))
    return blobs


def _render(blobs, d: int, voxel_size: float, s2: float) -> np.ndarray:
    """Sample the sum of Gaussian blobs, each convolved with an isotropic Gaussian of variance s2.

    Each blob is evaluated only within 6 standard deviations of its centre (where
    it has fallen below 2e-8 of its peak), which keeps large boxes fast.
    """
    c = d // 2
    out = np.zeros((d, d, d))
    for centre, cov, peak in blobs:
        total = cov + s2 * np.eye(3)
        # Convolution conserves each blob's mass, so its peak drops by the ratio of
        # the square roots of the covariance determinants.
        amp = peak * np.sqrt(np.linalg.det(cov) / np.linalg.det(total))
        reach = 6.0 * np.sqrt(np.linalg.eigvalsh(total).max()) / voxel_size
        pos = centre / voxel_size + c  # (x, y, z) in voxel indices
        lo = np.clip(np.floor(pos - reach).astype(int), 0, d)
        hi = np.clip(np.ceil(pos + reach).astype(int) + 1, 0, d)
        if np.any(hi <= lo):
            continue
        xs, ys, zs = ((np.arange(lo[a], hi[a]) - c) * voxel_size for a in range(3))
        z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
        diff = np.stack([x, y, z], axis=-1) - centre
        q = np.einsum("...i,ij,...j->...", diff, np.linalg.inv(total), diff)
        out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] += amp * np.exp(-0.5 * q)
    return out


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


def make_dataset(
    references,
    n_particles,
    masks=None,
    snr=0.1,
    labels=None,
    weights=None,
    preferred_orientation=None,
    max_shift=0,
    random_state=None,
    dtype=np.float32,
    voxel_size=1.0,
) -> SimulatedDataset:
    """Simulate subtomograms of known classes, orientations and shifts.

    Particle ``i`` of class ``k`` is ``Y_i(r) = A_k(R_i^T (r - t_i)) + n_i(r)``
    (the reference rotated with :func:`~mlsubtomo.transform.rotate_volume` using
    cubic splines, then circularly shifted with
    :func:`~mlsubtomo.transform.shift_volume`), with white Gaussian noise
    ``n_i``; then ``X_i = irfftn(rfftn(Y_i) * mask_i.observed(D))``: the mask is
    fixed in the particle (microscope) frame.

    Parameters
    ----------
    references : array-like of shape (K, D, D, D) or (D, D, D), or list of K volumes
        The clean class references ``A_k``, cubic, indexed ``[z, y, x]``.
    n_particles : int
        Number N of particles, at least 1.
    masks : mask object, list of N mask objects, bool ndarray, or None, default=None
        Missing-data geometry: one object with an ``observed(box_size)`` method
        (e.g. ``MissingWedge(-60, 60)``) for all particles, a list of N such
        objects, or boolean half-grid arrays of shape (D, D, D//2+1) or
        (N, D, D, D//2+1) (True = observed). None applies no Fourier masking.
    snr : float, default=0.1
        Signal-to-noise ratio ``var(signal) / var(noise)`` before masking, where
        ``var(signal)`` is the variance over the whole box of each particle's own
        clean rotated and shifted reference (so every particle has exactly this
        SNR in expectation, whatever its class). ``np.inf`` adds no noise.
    labels : array-like of shape (N,), optional
        Class of each particle, integers in ``[0, K)``. If None, drawn at random:
        a random permutation of an equal split when ``weights`` is None (every
        class appears when N >= K), else independently with probabilities
        ``weights``.
    weights : array-like of shape (K,), optional
        Class probabilities (normalised to sum 1), used only when ``labels`` is
        None.
    preferred_orientation : tuple (lo, hi), optional
        In degrees, ``0 <= lo < hi <= 180``: orientations are uniform on SO(3)
        except that none has its tilt (the second ZYZ Euler angle, as in
        :func:`~mlsubtomo.transform.euler_from_matrix`) in ``[lo, hi]``. For
        example (60, 120) is moderate and (40, 140) severe preferred orientation.
        None: uniform orientations.
    max_shift : int, default=0
        Shifts are uniform random integers in ``[-max_shift, max_shift]^3``;
        ``0 <= max_shift < D//2``.
    random_state : int, RandomState instance or None, default=None
        Seeds every random draw (labels, then rotations, then shifts, then the noise
        particle by particle), so equal seeds give identical data sets.
    dtype : floating dtype, default=np.float32
        Data type of ``volumes`` and ``references``. Fourier masking is done in
        single precision (the :class:`~mlsubtomo.fft.FFTBackend` precision).
    voxel_size : float, default=1.0
        Voxel size in Angstrom, recorded in the result (it does not change the
        simulation, which works in voxels).

    Returns
    -------
    SimulatedDataset

    Raises
    ------
    ValueError
        If an argument is invalid; the message names it.

    Examples
    --------
    >>> from mlsubtomo.simulate import groel_phantom, make_dataset
    >>> ref = groel_phantom(24)
    >>> data = make_dataset([ref], 3, snr=0.5, max_shift=1, random_state=0)
    >>> data.volumes.shape, data.labels.tolist()
    ((3, 24, 24, 24), [0, 0, 0])
    """
    refs = _check_references(references)
    n_classes, d = refs.shape[0], refs.shape[-1]
    n = _check_int("n_particles", n_particles, minimum=1)
    snr = _check_snr(snr)
    max_shift = _check_int("max_shift", max_shift, minimum=0)
    if max_shift >= d // 2:
        raise ValueError(f"max_shift must be smaller than D//2 = {d // 2}, got {max_shift}")
    band = _check_band(preferred_orientation)
    voxel_size = _check_positive("voxel_size", voxel_size)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    observed = _observed_sets(masks, n, d)
    labels_given = None if labels is None else _check_labels(labels, n, n_classes)
    probs = None if weights is None else _check_weights(weights, n_classes)

    rng = check_random_state(random_state)
    if labels_given is not None:
        labels = labels_given
    elif probs is None:
        # An equal split, shuffled: balanced classes and every class present
        # when N >= K, yet no pattern in the particle order.
        labels = rng.permutation(np.arange(n) % n_classes)
    else:
        labels = rng.choice(n_classes, size=n, p=probs)
    labels = np.asarray(labels, dtype=np.int64)
    rotations = _random_rotations(n, band, rng)
    shifts = rng.randint(-max_shift, max_shift + 1, size=(n, 3)).astype(np.int64)

    backend = FFTBackend("scipy")
    volumes = np.empty((n, d, d, d), dtype=dtype)
    noise_std = np.zeros(n)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        noisy = np.empty((stop - start, d, d, d))
        for j, i in enumerate(range(start, stop)):
            clean, noise, noise_std[i] = _noisy_particle(
                refs[labels[i]], rotations[i], shifts[i], snr, rng
            )
            noisy[j] = clean + noise
        masks_chunk = [observed[i] for i in range(start, stop)]
        if all(m is None for m in masks_chunk):
            volumes[start:stop] = noisy
        else:
            spectra = backend.rfftn(noisy)
            for j, m in enumerate(masks_chunk):
                if m is not None:
                    spectra[j] *= m
            volumes[start:stop] = backend.irfftn(spectra, d)

    return SimulatedDataset(
        volumes=volumes,
        masks=masks,
        labels=labels,
        rotations=rotations,
        shifts=shifts,
        references=refs.astype(dtype),
        snr=snr,
        noise_std=noise_std,
        max_shift=max_shift,
        voxel_size=voxel_size,
    )


def _noisy_particle(reference, rotation, shift, snr, rng):
    """Clean particle ``S_t R A``, its noise (before masking) and the noise std.

    The noise variance is ``var(clean) / snr`` over the whole box, so the SNR is
    the requested one for each particle, before any masking.
    """
    clean = shift_volume(rotate_volume(reference, rotation, order=INTERPOLATION_ORDER), shift)
    if np.isinf(snr):
        return clean, np.zeros_like(clean), 0.0
    std = float(np.sqrt(clean.var() / snr))
    noise = std * rng.standard_normal(clean.shape)
    return clean, noise, std


def _random_rotations(n: int, band, rng) -> np.ndarray:
    """N rotations uniform on SO(3), optionally with no tilt in ``band`` (by rejection)."""
    out = np.empty((0, 3, 3))
    while len(out) < n:
        # Normalised 4-D Gaussian vectors are uniform unit quaternions, hence
        # uniform rotations; drawn from rng so the result depends on it only.
        need = n - len(out)
        quats = rng.standard_normal((need if band is None else 2 * need + 8, 4))
        mats = Rotation.from_quat(quats / np.linalg.norm(quats, axis=1, keepdims=True)).as_matrix()
        if band is not None:
            tilt = euler_from_matrix(mats)[:, 1]
            mats = mats[(tilt < band[0]) | (tilt > band[1])]
        out = np.concatenate([out, mats[:need]])
    return out


def demo_dataset(n_particles=200, box_size=24, snr=0.1, random_state=0) -> SimulatedDataset:
    """The built-in data set of ``mlsubtomo demo``: GroEL-like versus GroEL-GroES-like.

    Two classes (0: :func:`groel_phantom`, 1: :func:`groel_groes_phantom`) in
    equal numbers, uniform orientations, a +-60 degree missing wedge about y
    (``MissingWedge(-60, 60)``), integer shifts up to 2 voxels. The voxel size is
    ``240 / box_size`` A (10 A for the default box of 24), so that the particle's
    bounding sphere (about 100 A) fits for any box size, and the resolution is 2.5
    voxels (25 A by default): detail well below Nyquist, which the interpolation
    of the rotations preserves.

    Parameters
    ----------
    n_particles : int, default=200
        Number of particles.
    box_size : int, default=24
        Side D of the cubic box in voxels (at least 12).
    snr : float, default=0.1
        Signal-to-noise ratio before masking (see :func:`make_dataset`): low
        enough to be realistic, high enough for two-class ML classification of
        200 particles to separate the classes.
    random_state : int, RandomState instance or None, default=0
        Seed of the simulation.

    Returns
    -------
    SimulatedDataset
    """
    from .masks import MissingWedge

    d = _check_int("box_size", box_size, minimum=2)
    voxel_size = 240.0 / d
    resolution = 2.5 * voxel_size
    refs = [
        groel_phantom(d, voxel_size, resolution),
        groel_groes_phantom(d, voxel_size, resolution),
    ]
    return make_dataset(
        refs,
        n_particles,
        masks=MissingWedge(-60, 60),
        snr=snr,
        max_shift=2,
        random_state=random_state,
        voxel_size=voxel_size,
    )


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _check_int(name, value, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _check_positive(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def _check_snr(snr) -> float:
    if isinstance(snr, bool) or not isinstance(snr, Real) or np.isnan(snr):
        raise ValueError(f"snr must be a positive number or np.inf, got {snr!r}")
    if snr <= 0:
        raise ValueError(f"snr must be positive (np.inf for no noise), got {snr}")
    return float(snr)


def _check_references(references) -> np.ndarray:
    try:
        refs = np.asarray(
            [np.asarray(r, dtype=np.float64) for r in references]
            if isinstance(references, list | tuple)
            else np.asarray(references, dtype=np.float64)
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"references must be (K, D, D, D) cubic volumes: {exc}") from exc
    if refs.ndim == 3:
        refs = refs[None]
    if (
        refs.ndim != 4
        or refs.shape[0] < 1
        or not (refs.shape[1] == refs.shape[2] == refs.shape[3])
    ):
        raise ValueError(
            f"references must have shape (K, D, D, D) with cubic boxes, got {refs.shape}"
        )
    if refs.shape[-1] < 2:
        raise ValueError(f"references must have a box of at least 2 voxels, got {refs.shape}")
    if not np.all(np.isfinite(refs)):
        raise ValueError("references must be finite")
    return refs


def _check_band(band):
    if band is None:
        return None
    try:
        lo, hi = (float(v) for v in band)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"preferred_orientation must be a pair (lo, hi) of tilts in degrees, got {band!r}"
        ) from exc
    if not (0.0 <= lo < hi <= 180.0):
        raise ValueError(f"preferred_orientation must satisfy 0 <= lo < hi <= 180, got {band!r}")
    if lo == 0.0 and hi == 180.0:
        raise ValueError("preferred_orientation (0, 180) excludes every orientation")
    return lo, hi


def _check_labels(labels, n: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError("labels must be integers")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) for {n_classes} references, "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


def _check_weights(weights, n_classes: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_classes,):
        raise ValueError(f"weights must have shape ({n_classes},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
    return w / w.sum()


def _observed_sets(masks, n: int, d: int) -> list:
    """Per particle, the boolean half-grid observed set, or None for no masking.

    Mask objects are evaluated once each (a list usually repeats a few
    geometries), in the particle frame (``rotation=None``).
    """
    shape = half_grid_shape(d)
    if masks is None:
        return [None] * n
    if isinstance(masks, np.ndarray):
        if masks.dtype != bool or masks.shape not in (shape, (n, *shape)):
            raise ValueError(
                f"masks given as an array must be boolean of shape {shape} or {(n, *shape)}, "
                f"got {masks.dtype} {masks.shape}"
            )
        return [masks] * n if masks.shape == shape else list(masks)
    if isinstance(masks, list | tuple):
        if len(masks) != n:
            raise ValueError(
                f"masks must be one mask or a list of n_particles={n}, got {len(masks)}"
            )
        items = list(masks)
    else:
        items = [masks] * n
    cache: dict = {}
    out = []
    for m in items:
        key = id(m)
        if key not in cache:
            if isinstance(m, np.ndarray):
                obs = m
            elif callable(getattr(m, "observed", None)):
                obs = np.asarray(m.observed(d))
            else:
                raise ValueError(
                    f"masks must be mask objects with an observed() method, got {type(m).__name__}"
                )
            if obs.dtype != bool or obs.shape != shape:
                raise ValueError(
                    f"masks must give boolean half-grid arrays of shape {shape}, "
                    f"got {obs.dtype} {obs.shape}"
                )
            cache[key] = obs
        out.append(cache[key])
    return out


# ---------------------------------------------------------------------------
# Low-pass filter and maps from atomic models
# ---------------------------------------------------------------------------


def _gaussian_transfer(box_size: int, voxel_size: float, resolution: float) -> np.ndarray:
    """Half-grid transfer ``2 ** -(f * resolution) ** 2`` (f in 1/Angstrom) of the low-pass.

    This is ``exp(-2 pi^2 s^2 f^2)`` with ``s^2 = ln 2 / (2 pi^2) * resolution^2``,
    the Gaussian the phantoms are convolved with: 1/2 at ``f = 1 / resolution``.
    """
    qx, qy, qz = frequency_grid(box_size)
    f2 = (qx**2 + qy**2 + qz**2) / (box_size * voxel_size) ** 2
    return np.exp(-np.log(2.0) * resolution**2 * f2)


def lowpass(volume, voxel_size, resolution) -> np.ndarray:
    """Gaussian low-pass filter with transfer 1/2 at spatial frequency ``1 / resolution``.

    The transfer is ``exp(-ln 2 * (f * resolution)^2)`` on the Fourier grid (f in
    1/Angstrom): the same Gaussian the phantoms of :func:`groel_phantom` are
    convolved with analytically, i.e. a convolution with a real-space Gaussian of
    standard deviation ``sqrt(ln 2 / 2) / pi * resolution`` (about 0.187
    resolution), applied here circularly on the grid. The DC component (the
    map's sum) is unchanged.

    Parameters
    ----------
    volume : array-like of shape (..., D, D, D)
        Real cubic volume(s), indexed ``[z, y, x]``.
    voxel_size : float
        Voxel size in Angstrom.
    resolution : float
        Resolution in Angstrom (any positive value; the transfer at Nyquist is
        ``2 ** -(resolution / (2 voxel_size))^2``).

    Returns
    -------
    ndarray of the shape of ``volume``
        float32 for float32 input, float64 otherwise.

    Raises
    ------
    ValueError
        If the volume is not cubic in its last three axes or an argument is not
        a positive number.

    Examples
    --------
    >>> import numpy as np
    >>> from mlsubtomo.simulate import lowpass
    >>> v = np.zeros((16, 16, 16)); v[8, 8, 8] = 1.0
    >>> w = lowpass(v, voxel_size=2.0, resolution=8.0)
    >>> round(float(w.sum()), 6), bool(w[8, 8, 8] == w.max())
    (1.0, True)
    """
    arr = np.asarray(volume)
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim < 3 or not (arr.shape[-1] == arr.shape[-2] == arr.shape[-3]):
        raise ValueError(
            f"volume must be cubic in its last three axes (..., D, D, D), got shape {arr.shape}"
        )
    voxel_size = _check_positive("voxel_size", voxel_size)
    resolution = _check_positive("resolution", resolution)
    d = arr.shape[-1]
    spectrum = np.fft.rfftn(arr, axes=(-3, -2, -1))
    spectrum *= _gaussian_transfer(d, voxel_size, resolution)
    return np.fft.irfftn(spectrum, s=(d, d, d), axes=(-3, -2, -1)).astype(dtype)


def density_from_pdb(
    path,
    voxel_size,
    box_size,
    resolution,
    assembly=None,
    align_principal_axes=False,
    normalize=True,
    oversampling=None,
) -> np.ndarray:
    """A density map simulated from an atomic model (PDB or mmCIF, optionally gzipped).

    Each non-hydrogen, non-water atom of the first model (first alternative
    conformation only) is a point mass weighted by its atomic number (its
    electron count); ligands and ions are kept. The atoms' centre of mass (with
    those weights) is put on voxel ``(D//2, D//2, D//2)``: an atom at ``(x, y, z)``
    Angstrom from it lies at voxel ``(x, y, z) / voxel_size + D//2`` of the
    ``[z, y, x]`` array. The point masses are spread onto a grid finer by
    ``oversampling`` with cubic B-spline weights (4 x 4 x 4 fine voxels per atom),
    whose own blur is divided out in Fourier space while the Gaussian low-pass of
    :func:`lowpass` (transfer 1/2 at ``1 / resolution``) is applied; the result is
    then sampled at the voxel centres. The map is thus the point masses convolved
    with the phantoms' Gaussian and sampled on the grid, as :func:`groel_phantom`
    is (aliasing included), to within about 0.5 % (relative L2 norm) with the
    default oversampling.

    Requires the optional dependency gemmi (``pip install "mlsubtomo[sim]"``).

    Parameters
    ----------
    path : str or path-like
        Coordinate file (``.pdb``, ``.cif``, ``.pdb.gz``, ... as gemmi reads them).
    voxel_size : float
        Voxel size in Angstrom.
    box_size : int
        Side D of the cubic box in voxels.
    resolution : float
        Resolution in Angstrom, at least ``2 * voxel_size`` (Nyquist).
    assembly : None, "first" or str, default=None
        None: the model as deposited (the asymmetric unit). ``"first"``: the first
        biological assembly of the file (REMARK 350 / ``_pdbx_struct_assembly``),
        e.g. the GroEL tetradecamer for 1OEL. Any other string: the assembly of
        that name (``"1"``, ...).
    align_principal_axes : bool, default=False
        Rotate the model about its centre of mass so that its unique principal
        axis (that of the eigenvalue of the mass covariance farthest from the
        other two; the symmetry axis of a symmetric top such as GroEL) lies along
        z, pointing so that the third moment of the mass along z is non-negative
        (the heavier or longer end at +z, like the GroES cap of
        :func:`groel_groes_phantom`). The rotation is the smallest one that does
        this, so the other two axes stay as close to the file's x and y as
        possible (for 1OEL the crystallographic two-fold about x is kept). False:
        the file's axes are used as they are.
    normalize : bool, default=True
        True: scale the map so that its maximum is 1, as the phantoms. False:
        electrons per cubic Angstrom.
    oversampling : int, optional
        Refinement of the splatting grid. Default: the smallest integer that makes
        its spacing at most 1/1.4 of the standard deviation of the low-pass
        Gaussian (``0.187 * resolution``): 1 for ``resolution >= 7.5 voxel_size``,
        4 at most (``resolution >= 2 voxel_size``). Memory grows as
        ``(oversampling * D)^3`` (float64 and its transform).

    Returns
    -------
    ndarray of shape (D, D, D), float32
        Indexed ``[z, y, x]``.

    Raises
    ------
    ImportError
        If gemmi is not installed.
    ValueError
        If an argument is invalid, the file has no atoms or no such assembly, or
        the molecule does not fit in the box: every atom must lie within the
        largest sphere about voxel ``D//2`` inside the box (radius
        ``((D - 1) // 2) * voxel_size``), the criterion of the phantoms, so that
        the map can be rotated without being cut.
    """
    try:
        import gemmi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "density_from_pdb needs gemmi, an optional dependency: "
            'pip install "mlsubtomo[sim]" (or pip install gemmi)'
        ) from exc
    voxel_size = _check_positive("voxel_size", voxel_size)
    d = _check_int("box_size", box_size, minimum=2)
    resolution = _check_positive("resolution", resolution)
    if resolution < 2.0 * voxel_size:
        raise ValueError(
            f"resolution must be at least 2 * voxel_size (Nyquist), got resolution="
            f"{resolution} with voxel_size={voxel_size}"
        )
    sigma = np.sqrt(np.log(2.0) / 2.0) / np.pi * resolution
    if oversampling is None:
        oversampling = max(1, int(np.ceil(1.4 * voxel_size / sigma - 1e-9)))
    os_ = _check_int("oversampling", oversampling, minimum=1)

    xyz, weights = _atoms_from_file(gemmi, path, assembly)
    centre = weights @ xyz / weights.sum()
    xyz = xyz - centre
    if align_principal_axes:
        xyz = xyz @ _principal_axes_rotation(xyz, weights).T
    extent = float(np.sqrt((xyz**2).sum(axis=1).max()))
    room = ((d - 1) // 2) * voxel_size
    if extent > room:
        raise ValueError(
            f"the molecule (radius {extent:.0f} A about its centre of mass) does not fit in "
            f"a box of box_size={d} voxels of voxel_size={voxel_size} A (room for a radius "
            f"of {room:.0f} A); increase box_size or voxel_size"
        )

    # Cubic B-spline splatting on the fine grid (coarse voxel i is fine voxel
    # os * i): each atom is spread over 4 x 4 x 4 fine voxels.
    n = os_ * d
    h = voxel_size / os_
    pos = xyz / h + os_ * (d // 2)  # (x, y, z) in fine voxels
    base = np.floor(pos).astype(np.int64) - 1
    t = pos - np.floor(pos)
    spline = np.stack(  # weights of base + 0..3, shape (4, N, 3)
        [
            (1.0 - t) ** 3 / 6.0,
            (3.0 * t**3 - 6.0 * t**2 + 4.0) / 6.0,
            (-3.0 * t**3 + 3.0 * t**2 + 3.0 * t + 1.0) / 6.0,
            t**3 / 6.0,
        ]
    )
    fine = np.zeros(n**3)
    for k in range(4):
        iz = (base[:, 2] + k) % n
        for j in range(4):
            iy = (base[:, 1] + j) % n
            wzy = weights * spline[k, :, 2] * spline[j, :, 1]
            for i in range(4):
                ix = (base[:, 0] + i) % n
                fine += np.bincount(
                    (iz * n + iy) * n + ix, weights=wzy * spline[i, :, 0], minlength=n**3
                )
    fine = fine.reshape(n, n, n) / h**3  # electrons per cubic Angstrom

    # Divide out the spline kernel (transfer sinc^4 on each axis) and apply the
    # Gaussian low-pass, then sample the coarse voxels.
    qx, qy, qz = frequency_grid(n)
    kernel = (np.sinc(qx / n) * np.sinc(qy / n) * np.sinc(qz / n)) ** 4
    spectrum = np.fft.rfftn(fine)
    spectrum *= _gaussian_transfer(n, h, resolution) / kernel
    volume = np.fft.irfftn(spectrum, s=(n, n, n), axes=(0, 1, 2))[::os_, ::os_, ::os_]
    if normalize:
        volume = volume / volume.max()
    return np.ascontiguousarray(volume, dtype=np.float32)


def _atoms_from_file(gemmi, path, assembly) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N, 3) in Angstrom and atomic numbers of the atoms kept."""
    st = gemmi.read_structure(str(path))
    if len(st) == 0:
        raise ValueError(f"{path} holds no model")
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    st.remove_waters()
    st.remove_empty_chains()
    model = st[0]
    if assembly is not None:
        if not isinstance(assembly, str):
            raise ValueError(
                f'assembly must be None, "first" or an assembly name, got {assembly!r}'
            )
        names = [a.name for a in st.assemblies]
        if not names:
            raise ValueError(f"{path} defines no biological assembly (assembly={assembly!r})")
        if assembly == "first":
            chosen = st.assemblies[0]
        elif assembly in names:
            chosen = st.assemblies[names.index(assembly)]
        else:
            raise ValueError(f"assembly must be 'first' or one of {names}, got {assembly!r}")
        model = gemmi.make_assembly(chosen, model, gemmi.HowToNameCopiedChain.AddNumber)
    xyz = []
    weights = []
    for chain in model:
        for residue in chain:
            for atom in residue:
                xyz.append(atom.pos.tolist())
                weights.append(atom.element.atomic_number)
    if not xyz:
        raise ValueError(f"{path} holds no atoms other than hydrogens and waters")
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights <= 0):
        raise ValueError(f"{path} has atoms of unknown element (atomic number 0)")
    return np.asarray(xyz, dtype=np.float64), weights


def _principal_axes_rotation(xyz: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Smallest rotation taking the unique principal axis of centred atoms to +z.

    The unique axis is the eigenvector of the mass covariance whose eigenvalue
    is farthest from the other two; its sign makes the third moment along it
    non-negative.
    """
    cov = (xyz * weights[:, None]).T @ xyz / weights.sum()
    values, vectors = np.linalg.eigh(cov)
    gaps = [min(abs(values[i] - values[j]) for j in range(3) if j != i) for i in range(3)]
    axis = vectors[:, int(np.argmax(gaps))]
    if weights @ (xyz @ axis) ** 3 < 0:
        axis = -axis
    z = np.array([0.0, 0.0, 1.0])
    cross = np.cross(axis, z)
    sin, cos = np.linalg.norm(cross), float(axis @ z)
    if sin < 1e-12:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    return Rotation.from_rotvec(cross / sin * np.arctan2(sin, cos)).as_matrix()

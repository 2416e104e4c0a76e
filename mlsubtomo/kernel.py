"""The likelihood kernel: scores of every (class, orientation, shift), posteriors, statistics.

For a chunk of particles and the current model this module

1. rotates each reference once per orientation (real space, about the box centre)
   and Fourier transforms it;
2. scores every searched (particle, class, orientation, shift): the cross term
   over all shifts comes from ``w_i X_i conj(R A_k)`` per (particle, class,
   orientation), summed either by one inverse FFT of the whole volume or, for a
   small cube of shifts, by partial DFTs that compute only the shifts searched
   (three matrix products, the first over the lines of the half grid that carry
   data: about half of them under a +-60 degree wedge); the masked power
   ``sum_q m w_i |R A_k|^2`` of all particles comes from one matrix product per
   orientation block;
3. normalises with log-sum-exp, giving each particle's log-likelihood, class
   posteriors and best (class, orientation, shift);
4. (``accumulate=True``) accumulates the sufficient statistics of design section 2b
   over the (particle, class, orientation) pairs whose posterior is not negligible
   relative to the particle's best pair, summing per (class, orientation) over the
   chunk before rotating back into the reference frame once per pair.

Orientation blocks are the unit of parallel work (joblib threads by default). The
first pass keeps per-pair maxima and log-sums and, when the memory budget allows
(:func:`chunk_plan`), the scores of the pairs that the best score so far of their
particle does not rule out, so that the second pass need not recompute them.

Fourier arrays are half grids of volumes whose rotation centre has been moved to
index 0 (:func:`mlsubtomo.transform.centre_for_fft`), so rotating a volume rotates
its transform without a phase ramp.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numba
import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from scipy.spatial.transform import Rotation
from threadpoolctl import ThreadpoolController

from .fft import FFTBackend, frequency_grid, half_grid_shape, hermitian_multiplicity
from .masks import FullData
from .stats import SufficientStatistics
from .transform import (
    centre_for_fft,
    outside_value,
    rotate_centred,
    shift_volume,
    trilinear_corners,
    uncentre_from_fft,
)

__all__ = [
    "ChunkResult",
    "KernelSettings",
    "Model",
    "ParticleChunk",
    "SearchSpace",
    "chunk_plan",
    "chunk_totals",
    "correlation_search",
    "crop_ball",
    "crop_index",
    "crop_problem",
    "e_step",
    "hard_statistics",
    "kept_pairs",
    "log_orientation_prior",
    "pair_result",
    "rotate_block",
    "rotated_observed",
    "rotated_transforms",
    "band_weights",
    "block_candidates",
    "index_blocks",
    "logsumexp",
    "prepare_particles",
    "rotation_contrast",
    "searched_pairs",
    "to_fourier",
    "to_real",
    "shift_window",
]

# Bytes of scratch memory one batch of pair products may use. Larger batches spend
# less of the interpreter lock per pair; past this, cache misses cost more. An
# iteration of the paper's setting on 1000 orientations took 10.1 / 6.0 s (n_jobs 1
# / 2) with 4 MiB, 9.9 / 5.5 s with 8 MiB, 9.8-10.3 / 5.3-5.5 s with 16 MiB and
# 11.7 / 6.6 s with 32 MiB.
_PAIR_BATCH_BYTES = 1 << 23
# Voxels of the particles prepared at once, so that the temporaries stay far below
# the size of the data.
_PREPARE_SLICE_VOXELS = 1 << 24
# Keeping the scores is only worth it when it leaves chunks at least this large.
_MIN_SCORED_CHUNK = 64
# Most particles or pairs whose observed sets and transforms a back-rotation holds at once.
_BACK_ROTATION_BATCH = 64


@dataclass
class Model:
    """The model parameters the E-step needs.

    Attributes
    ----------
    references : ndarray of shape (K, D, D, D), float32
        Class averages in real space (indexed [z, y, x]).
    log_class_weights : ndarray of shape (K,)
        log alpha_k; -inf for an empty class.
    sigma : float
        Per-voxel real-space noise standard deviation.
    """

    references: np.ndarray
    log_class_weights: np.ndarray
    sigma: float


@dataclass
class SearchSpace:
    """The hidden orientations and shifts that are searched.

    Attributes
    ----------
    rotations : ndarray of shape (R, 3, 3)
        Orientation set; particle X_i(r) ~ A_k(R^T (r - t)).
    shifts : ndarray of shape (T, 3), int
        Integer shifts (x, y, z) in voxels.
    log_shift_prior : ndarray of shape (T,)
        log pi(t), normalised over ``shifts``.
    log_orientation_prior : float or None
        log pi(R) of every orientation, e.g. ``-log`` of the size of the grid that
        a pruned search stands for (xmipp keeps 1/Nang under local searches).
        None: uniform over the orientations each particle searches.
    """

    rotations: np.ndarray
    shifts: np.ndarray
    log_shift_prior: np.ndarray
    log_orientation_prior: float | None = None


@dataclass
class ParticleChunk:
    """Prepared particles (see :func:`prepare_particles`).

    Attributes
    ----------
    data : ndarray of shape (n, D, D, D//2+1), complex64
        Centred Fourier transforms multiplied by their observed sets, w_i X_i.
    power : ndarray of shape (n,)
        ||X_i||^2 over O_i (full grid).
    n_observed : ndarray of shape (n,)
        n_i = |O_i| on the full grid.
    group : ndarray of shape (n,), int
        Index of each particle's mask in ``KernelSettings.masks``.
    candidates : ndarray of shape (n, R) or (n, K, R), bool, or None
        Orientations searched for each particle (in every class, or per class);
        None searches all.
    """

    data: np.ndarray
    power: np.ndarray
    n_observed: np.ndarray
    group: np.ndarray
    candidates: np.ndarray | None = None

    def __len__(self) -> int:
        return self.data.shape[0]

    def subset(self, index: np.ndarray, candidates: np.ndarray | None = None) -> ParticleChunk:
        """The particles at ``index``, searching ``candidates``."""
        return ParticleChunk(
            self.data[index], self.power[index], self.n_observed[index], self.group[index],
            candidates,
        )


@dataclass
class KernelSettings:
    """How the kernel computes, as opposed to what.

    Attributes
    ----------
    masks : list of Mask
        The distinct missing-data geometries; rotated copies come from their geometry.
    mask_arrays : ndarray of shape (G, D, D, D//2+1), bool
        The unrotated observed sets (band included) of ``masks``.
    max_resolution : float or None
        Band limit in cycles per voxel passed to ``Mask.observed``.
    pruning_threshold : float
        A (particle, class, orientation) pair enters the statistics when its largest
        posterior over shifts is at least this fraction of the particle's largest;
        0 keeps every pair with a posterior that is not exactly zero.
    interpolation_order : int
        Spline order of the real-space rotations.
    rotation : {"real", "fourier"}
        How references are rotated for scoring: in real space (spline of
        ``interpolation_order``, then an FFT), or the same trilinear rotation
        computed in Fourier space from their transforms padded to twice the box
        (:class:`_PaddedTransforms`). Statistics are always rotated back in real space.
    fft_backend, threads : str, int
        Passed to :class:`mlsubtomo.fft.FFTBackend`.
    orientation_block : int
        Orientations rotated and scored together: the unit of parallel work.
    n_jobs : int
        Orientation blocks processed at once (joblib; threads unless the caller
        chose another backend).
    keep_scores : bool
        Keep the scores of the first pass that the second may need (see
        :func:`chunk_plan`) instead of recomputing those of the significant pairs.
    shift_method : {"auto", "fft", "window"}
        How the cross terms over the shift window are summed: inverse FFTs of whole
        volumes, or partial DFTs over the cube of shifts only ("auto" picks the
        window when the cube's edge 2L + 1 is at most 4/7 of the box's).
    shift_period : int or None
        Box size whose voxels the shifts count, when the arrays are a Fourier crop
        of a larger box (:func:`crop_problem`); None: the arrays' own box. Only the
        partial-DFT window can shift by fractions of the cropped box's voxels.
    """

    masks: list
    mask_arrays: np.ndarray
    max_resolution: float | None = 0.5
    pruning_threshold: float = 0.0
    interpolation_order: int = 1
    rotation: str = "real"
    fft_backend: str = "pyfftw"
    threads: int = 1
    orientation_block: int = 16
    n_jobs: int = 1
    keep_scores: bool = True
    shift_method: str = "auto"
    shift_period: int | None = None


@dataclass
class ChunkResult:
    """Per-particle results of an E-step over one chunk, and its statistics.

    Attributes
    ----------
    log_likelihood : ndarray of shape (n,)
    class_log_posterior : ndarray of shape (n, K)
    best_class, best_rotation : ndarray of shape (n,), int
        ``best_rotation`` indexes ``SearchSpace.rotations``.
    best_shift : ndarray of shape (n, 3), int
    max_posterior : ndarray of shape (n,)
    statistics : SufficientStatistics or None
    rotations : ndarray of shape (n, 3, 3) or None
        The matrices of ``best_rotation``, filled in by the caller.
    pair_log_mass : ndarray of shape (n, K, R) or None
        log of the unnormalised posterior mass of each (class, orientation) summed
        over shifts (-inf where not searched), when :func:`e_step` keeps it.
    """

    log_likelihood: np.ndarray
    class_log_posterior: np.ndarray
    best_class: np.ndarray
    best_rotation: np.ndarray
    best_shift: np.ndarray
    max_posterior: np.ndarray
    statistics: SufficientStatistics | None = field(default=None)
    rotations: np.ndarray | None = field(default=None)
    pair_log_mass: np.ndarray | None = field(default=None)

    _PER_PARTICLE = (
        "log_likelihood", "class_log_posterior", "best_class", "best_rotation",
        "best_shift", "max_posterior",
    )

    def _fields(self):
        return self._PER_PARTICLE + (("pair_log_mass",) if self.pair_log_mass is not None else ())

    @classmethod
    def concatenate(cls, results: list[ChunkResult]) -> ChunkResult:
        """Per-particle results of consecutive chunks joined (statistics left out)."""
        return cls(**{
            name: np.concatenate([getattr(r, name) for r in results])
            for name in results[0]._fields()
        })

    def take(self, index: np.ndarray) -> ChunkResult:
        """The per-particle results of the particles at ``index`` (statistics left out)."""
        return ChunkResult(**{name: getattr(self, name)[index] for name in self._fields()})


def logsumexp(a: np.ndarray, axis, xp=np) -> np.ndarray:
    """log(sum(exp(a))) along ``axis``; -inf where every entry is -inf, without warnings.

    ``xp``: the array module of ``a`` (NumPy, or CuPy for :mod:`mlsubtomo.gpu`).
    """
    top = xp.max(a, axis=axis, keepdims=True)
    finite_top = xp.where(xp.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = xp.log(xp.sum(xp.exp(a - finite_top), axis=axis, keepdims=True)) + finite_top
    out = xp.where(top == -xp.inf, -xp.inf, out)
    return xp.squeeze(out, axis=axis)


def shift_window(max_shift: int, xi: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer shifts in the cube of half-width ``max_shift`` and their log prior.

    The prior is an isotropic Gaussian of standard deviation ``xi`` voxels,
    normalised over the cube; ``xi = 0`` puts all mass on the zero shift.
    """
    span = np.arange(-max_shift, max_shift + 1)
    tz, ty, tx = np.meshgrid(span, span, span, indexing="ij")
    shifts = np.stack([tx.ravel(), ty.ravel(), tz.ravel()], axis=1)
    sq = np.sum(shifts.astype(np.float64) ** 2, axis=1)
    if xi > 0:
        log_prior = -sq / (2.0 * xi * xi)
    else:
        log_prior = np.where(sq == 0, 0.0, -np.inf)
    return shifts, log_prior - logsumexp(log_prior, axis=0)


def prepare_particles(
    volumes: np.ndarray,
    settings: KernelSettings,
    group: np.ndarray,
    base_shifts: np.ndarray | None = None,
) -> ParticleChunk:
    """Centred transforms of particles restricted to their observed sets.

    Parameters
    ----------
    volumes : ndarray of shape (n, D, D, D)
    settings : KernelSettings
    group : ndarray of shape (n,), int
        Index of each particle's mask in ``settings.masks``.
    base_shifts : ndarray of shape (n, 3), int, optional
        Shifts (x, y, z) taken out of each particle before the search, which then
        looks for the remaining shift around them.

    Returns
    -------
    ParticleChunk
    """
    d, n = volumes.shape[-1], volumes.shape[0]
    backend = FFTBackend(settings.fft_backend, settings.threads)
    group = np.asarray(group)
    data = np.empty((n, *half_grid_shape(d)), dtype=np.complex64)
    power = np.empty(n)
    step = max(1, _PREPARE_SLICE_VOXELS // d**3)
    for s in range(0, n, step):
        part = np.asarray(volumes[s : s + step], dtype=np.float32)
        if base_shifts is not None:
            pairs = zip(part, base_shifts[s : s + step], strict=True)
            part = np.stack([shift_volume(v, -t) for v, t in pairs])
        block = data[s : s + step]
        block[...] = backend.rfftn(centre_for_fft(part))
        block *= settings.mask_arrays[group[s : s + step]]
        power[s : s + step] = _full_grid_power(block)
    counts = _full_grid_power(settings.mask_arrays)
    return ParticleChunk(data, power, counts[group], group)


def _full_grid_power(half_grids: np.ndarray) -> np.ndarray:
    """``sum |a|^2`` over the full grid of each half grid in a stack (float64).

    For boolean observed sets this is their size n_i.
    """
    d = half_grids.shape[-2]
    squares = np.abs(half_grids).astype(np.float64) ** 2
    return np.einsum("nzyx,x->n", squares, hermitian_multiplicity(d))


def crop_index(box_size: int, crop_size: int) -> tuple:
    """Index of the half grid of an even ``crop_size`` inside that of ``box_size``.

    ``array[(..., *crop_index(D, d))]`` holds the components of frequency
    ``|qz|, |qy| < d/2`` and ``qx <= d/2`` in the layout of a box of size d.
    """
    half = crop_size // 2
    side = np.r_[0:half, box_size - half : box_size]
    return np.ix_(side, side, np.arange(half + 1))


def crop_ball(crop_size: int) -> np.ndarray:
    """Half-grid components of a box of size ``crop_size`` with ``|q| < crop_size / 2``."""
    qx, qy, qz = frequency_grid(crop_size)
    return qx**2 + qy**2 + qz**2 < (crop_size / 2) ** 2


class _CroppedMask:
    """A mask of the full box seen through a Fourier crop (:func:`crop_problem`)."""

    def __init__(self, mask, box_size, crop_size, max_resolution):
        self.mask = mask
        self.index = crop_index(box_size, crop_size)
        self.box_size = box_size
        self.ball = crop_ball(crop_size)
        self.max_resolution = max_resolution

    def observed(self, box_size, rotation=None, max_resolution=None):
        full = self.mask.observed(
            self.box_size, rotation=rotation, max_resolution=self.max_resolution
        )
        return full[(..., *self.index)] & self.ball


def crop_problem(chunk: ParticleChunk, settings: KernelSettings, crop_size: int):
    """The particles and settings of a Fourier crop to an even box ``crop_size``.

    Only the components with ``|q| < crop_size / 2`` are kept, in the layout of a box
    of that size; the likelihood of those components is exactly that of the full
    problem restricted to them (the FFTs are orthonormal, so sigma is unchanged),
    and shifts still count voxels of the full box (``shift_period``).

    Returns
    -------
    ParticleChunk, KernelSettings
    """
    d = chunk.data.shape[-2]
    index = crop_index(d, crop_size)
    ball = crop_ball(crop_size)
    arrays = settings.mask_arrays[(slice(None), *index)] & ball
    data = chunk.data[(slice(None), *index)] * ball
    counts = _full_grid_power(arrays)
    cropped = ParticleChunk(
        data, _full_grid_power(data), counts[chunk.group], chunk.group, chunk.candidates
    )
    masks = [_CroppedMask(m, d, crop_size, settings.max_resolution) for m in settings.masks]
    return cropped, dataclasses.replace(
        settings, masks=masks, mask_arrays=arrays, shift_period=d
    )


def band_weights(box_size: int, max_resolution: float | None) -> np.ndarray:
    """Full-grid multiplicity of each half-grid component inside the band, 0 outside.

    The band is ``0 < |q| < max_resolution * D`` (all but DC for None); its sum is J,
    the number of components of a complete particle.
    """
    band = FullData().observed(box_size, max_resolution=max_resolution)
    return band * hermitian_multiplicity(box_size)


def to_fourier(volumes: np.ndarray, fft_backend: str = "pyfftw") -> np.ndarray:
    """Centred half-grid transforms (complex128) of real volumes (..., D, D, D)."""
    backend = FFTBackend(fft_backend)
    return backend.rfftn(centre_for_fft(np.asarray(volumes, dtype=np.float32))).astype(
        np.complex128
    )


def to_real(transforms: np.ndarray, box_size: int, fft_backend: str = "pyfftw") -> np.ndarray:
    """Inverse of :func:`to_fourier`, float32."""
    backend = FFTBackend(fft_backend)
    return uncentre_from_fft(backend.irfftn(transforms, box_size))


def rotated_transforms(
    references: np.ndarray, rotations: np.ndarray, settings: KernelSettings
) -> np.ndarray:
    """Centred half-grid transforms of every reference at every rotation, (K, R, ...).

    Computing these once per iteration and passing them to :func:`e_step` saves each
    particle chunk from rotating the references itself. Orientation blocks are
    rotated in parallel (``settings.n_jobs`` threads).
    """
    blocks = index_blocks(len(rotations), settings.orientation_block)
    padded = _PaddedTransforms(references, settings) if settings.rotation == "fourier" else None
    with _blas_threads(settings):
        parts = list(_parallel(settings.n_jobs)(
            delayed(rotate_block)(references, rotations[block], settings, padded=padded)
            for block in blocks
        ))
    return np.concatenate(parts, axis=1)


def rotation_contrast(
    model: Model, settings: KernelSettings, angle: float, n_samples: int = 32
) -> float:
    """How far (nats) a score can move when the reference turns by ``angle`` degrees.

    The largest ``sum_q m_g w |V_k(R) - V_k(R D)|^2 / (2 sigma^2)`` over the classes,
    the mask groups and ``n_samples`` orientations R, each turned by a rotation D of
    ``angle`` about its own axis (drawn with a fixed seed, so that a fit stays
    reproducible). For a particle at R, it is the expected score lost by placing it
    at R D instead, about which its noise spreads by ``sqrt(2 x)``.
    """
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(n_samples, 3))
    axes *= np.deg2rad(angle) / np.linalg.norm(axes, axis=1, keepdims=True)
    start = Rotation.random(n_samples, random_state=rng)
    turned = start * Rotation.from_rotvec(axes)
    both = rotated_transforms(
        model.references, np.concatenate([start.as_matrix(), turned.as_matrix()]), settings
    )
    change = np.abs(both[:, :n_samples] - both[:, n_samples:]).astype(np.float64) ** 2
    weights = settings.mask_arrays * hermitian_multiplicity(model.references.shape[-1])
    groups = weights.reshape(len(weights), -1)
    return float(np.max(groups @ change.reshape(-1, groups.shape[1]).T)) / (
        2.0 * model.sigma**2
    )


def rotate_block(references, rotations, settings, needed=None, padded=None):
    """Transforms of the references at ``rotations``: (K, b, ...), or with ``needed``
    (K, b) bool only those of the needed (class, orientation) pairs, (m, ...) in the
    order of ``np.flatnonzero(needed)``. ``padded``: the :class:`_PaddedTransforms` of
    the references, for ``settings.rotation == "fourier"`` (made here when None)."""
    k, d = references.shape[0], references.shape[-1]
    if needed is None:
        pairs = np.ones((k, len(rotations)), dtype=bool)
    else:
        pairs = needed
    if settings.rotation == "fourier":
        if padded is None:
            padded = _PaddedTransforms(references, settings)
        out = padded.rotated(rotations, pairs)
        return out.reshape(k, len(rotations), *out.shape[1:]) if needed is None else out
    backend = FFTBackend(settings.fft_backend, settings.threads)
    centred = centre_for_fft(np.asarray(references, dtype=np.float32))
    order = settings.interpolation_order
    if pairs.all():
        rotated = np.empty((k, len(rotations), d, d, d), dtype=np.float32)
        for ri, matrix in enumerate(rotations):
            rotated[:, ri] = rotate_centred(centred, matrix, order=order)
        out = backend.rfftn(rotated)
        return out if needed is None else out.reshape(-1, *out.shape[2:])
    slots = _slots(needed)
    out = np.empty((int(needed.sum()), *half_grid_shape(d)), dtype=np.complex64)
    # One orientation at a time: batches of at most K volumes need few FFT plans.
    for ri in np.flatnonzero(needed.any(axis=0)):
        classes = np.flatnonzero(needed[:, ri])
        out[slots[classes, ri]] = backend.rfftn(
            rotate_centred(centred[classes], rotations[ri], order)
        )
    return out


class _PaddedTransforms:
    """Real-space trilinear rotation computed in Fourier space
    (``settings.rotation == "fourier"``): the references are padded to twice the box
    and transformed once, and each rotated transform is sampled from them by
    trilinear interpolation at ``R^T q``, only where a mask of the settings observes
    q (band included), times the transfer of real-space trilinear interpolation.

    Against rotating in real space and transforming, this skips the FFT and
    interpolates a sixth as many points (those of the band's half ball observed):
    less than half the time per pair (D = 32: 0.18-0.19 ms against 0.42-0.44 ms,
    side by side).
    """

    def __init__(self, references, settings):
        k, d = references.shape[0], references.shape[-1]
        # Interpolating a transform trilinearly multiplies the volume by sinc^2 along
        # each axis (of the padded box): dividing by it first (gridding correction)
        # brings the samples within about 2% of the transform of the rotated phantom
        # rendered exactly (GroEL-GroES, D = 32, 20 random rotations: median 1.7%).
        # Outside the box a reference takes outside_value, as in the real-space rotation:
        # the padding holds the reference less that value, since a constant adds only
        # the DC component, which no mask observes.
        taper = np.sinc((np.arange(d) - d // 2) / (2.0 * d)) ** 2
        big = np.zeros((k, 2 * d, 2 * d, 2 * d), dtype=np.float32)
        lo = d - d // 2
        background = outside_value(references)[:, None, None, None]
        big[:, lo:lo + d, lo:lo + d, lo:lo + d] = (references - background) / (
            taper[:, None, None] * taper[None, :, None] * taper[None, None, :]
        )
        backend = FFTBackend(settings.fft_backend, settings.threads)
        # Orthonormal transforms: the padded one samples the box's at 2q, times 2^-1.5.
        padded = backend.rfftn(centre_for_fft(big)) * np.float32(2.0**1.5)
        self.d = d
        observed = settings.mask_arrays.any(axis=0)
        self.where = np.flatnonzero(observed)
        qx, qy, qz = (np.broadcast_to(f, observed.shape)[observed] for f in frequency_grid(d))
        self.frequencies = np.stack([qx, qy, qz], axis=1)
        # A source 2 R^T q lies within 2 |q| of the origin on every axis. The table
        # repeats the periodic y and z axes (and the Nyquist column of x) that far out,
        # so the sampler indexes it directly. With one compiled call per block and
        # single-precision corner weights, sampling became 1.3 times faster
        # (D = 24-32, best of three, one core).
        n, last = 2 * d, d
        self.offset = int(np.ceil(2.0 * np.sqrt(np.max(np.sum(self.frequencies**2, axis=1),
                                                       initial=0.0)))) + 1
        around = np.arange(-self.offset, self.offset + 2) % n
        ahead = np.minimum(np.arange(self.offset + 2), last)
        self.table = np.ascontiguousarray(padded[:, around][:, :, around][..., ahead])

    def rotated(self, rotations, needed, lines=None):
        """Half-grid transforms (m, D, D, D//2+1) of the needed (K, b) pairs, in the
        order of ``np.flatnonzero(needed)``; zero where no mask observes. With
        ``lines`` (:class:`_Lines` of the same masks), in its layout instead."""
        d = self.d
        shape, where = ((d, d, d // 2 + 1), self.where) if lines is None else (
            lines.shape, lines.positions(self.where)
        )
        out = np.zeros((int(needed.sum()), math.prod(shape)), dtype=np.complex64)
        _sample_transforms(
            self.table, self.offset, 2 * d, np.asarray(rotations, dtype=np.float64),
            self.frequencies, where, _slots(needed), out,
        )
        return out.reshape(len(out), *shape)


@numba.njit(cache=True, nogil=True)
def _sample_transforms(
    table, offset, n, rotations, frequencies, where, slots, out
):  # pragma: no cover - compiled
    """``out[slots[k, r], where[j]]``: the transform of class k (padded box of side
    ``n``, origin at ``offset`` of the extended ``table``) trilinearly interpolated at
    ``2 rotations[r]^T frequencies[j]``, with the Hermitian partner of a source at
    negative x, times the transfer of real-space trilinear interpolation there; pairs
    with a negative slot are skipped.

    Real-space trilinear interpolation at R^T r multiplies the transform by sinc^2 per
    axis of the source frequency. Scoring against the ideal rotation instead (1.7%
    from the exact one, where real-space trilinear is 9% off) cost accuracy: on the
    paper's setting (SNR 0.05) the median orientation error ended 1.8 degrees above
    the grid's floor, against 0.8 in real space and 0.5 with this low-pass (one seed
    each).
    """
    n_classes = slots.shape[0]
    for r in range(rotations.shape[0]):
        if np.max(slots[:, r]) < 0:
            continue
        m = rotations[r]
        for j in range(frequencies.shape[0]):
            qx, qy, qz = frequencies[j, 0], frequencies[j, 1], frequencies[j, 2]
            # (x, y, z) of 2 R^T q.
            sx = 2.0 * (qx * m[0, 0] + qy * m[1, 0] + qz * m[2, 0])
            sy = 2.0 * (qx * m[0, 1] + qy * m[1, 1] + qz * m[2, 1])
            sz = 2.0 * (qx * m[0, 2] + qy * m[1, 2] + qz * m[2, 2])
            # n is twice the box: s / n is the source frequency in cycles per voxel.
            gain = _sinc_squared(sx / n) * _sinc_squared(sy / n) * _sinc_squared(sz / n)
            flip = sx < 0
            if flip:
                sx, sy, sz = -sx, -sy, -sz
            fx, fy, fz = np.floor(sx), np.floor(sy), np.floor(sz)
            # Single-precision weights keep the corner arithmetic in complex64.
            wx, wy, wz = np.float32(sx - fx), np.float32(sy - fy), np.float32(sz - fz)
            one = np.float32(1.0)
            x0, y0, z0 = int(fx), int(fy) + offset, int(fz) + offset
            for k in range(n_classes):
                row = slots[k, r]
                if row < 0:
                    continue
                value = trilinear_corners(
                    table[k], z0, z0 + 1, y0, y0 + 1, x0, x0 + 1,
                    one - wz, wz, one - wy, wy, one - wx, wx,
                ) * np.float32(gain)
                out[row, where[j]] = np.conj(value) if flip else value


# Taylor coefficients of sinc in (pi f)^2: (-1)^k / (2k+1)!, k = 0..10.
_SINC_TAYLOR = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(11))


@numba.njit(cache=True, inline="always")
def _sinc_squared(f):  # pragma: no cover - compiled
    """``np.sinc(f) ** 2``.

    Source frequencies lie within |f| < sqrt(3)/2 cycles per padded voxel, where the
    series to (pi f)^20 is within 2e-10 of sinc: three sines per sample had cost
    about a third of the sampling.
    """
    if abs(f) >= 1.0:
        x = np.pi * f
        s = np.sin(x) / x
        return s * s
    x = (np.pi * f) ** 2
    s = _SINC_TAYLOR[10]
    for k in range(9, -1, -1):
        s = s * x + _SINC_TAYLOR[k]
    return s * s


def _slots(needed):
    """(K, b) int: the index of each needed pair in ``np.flatnonzero(needed)``, else -1."""
    slots = np.full(needed.shape, -1, dtype=np.int64)
    slots[needed] = np.arange(int(needed.sum()))
    return slots


def _parallel(n_jobs):
    """Threads by default: the tasks share the chunk's arrays and spend their time in
    BLAS, FFTW and scipy.ndimage, which release the GIL. A joblib backend chosen by
    the caller (e.g. ``parallel_config(backend="dask")``) takes precedence."""
    return Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")


@functools.cache
def _thread_pools() -> ThreadpoolController:
    """The BLAS and OpenMP pools of this process, found once: ``threadpool_limits``
    looks for them again on every call (4 ms, against 0.02 ms for a limit set here)."""
    return ThreadpoolController()


def _blas_threads(settings):
    """Each task's small matrix products run on ``settings.threads`` BLAS threads, so
    that n_jobs tasks fill the cores without oversubscribing them."""
    return _thread_pools().limit(limits=settings.threads, user_api="blas")


def _with_blas_threads(function):
    @functools.wraps(function)
    def wrapper(chunk, model, search, settings, *args, **kwargs):
        with _blas_threads(settings):
            return function(chunk, model, search, settings, *args, **kwargs)

    return wrapper


def chunk_plan(
    n_particles: int,
    n_classes: int,
    n_rotations: int,
    n_shifts: int,
    box_size: int,
    memory_budget: float,
) -> tuple[int, bool, bool]:
    """How to cover ``n_particles`` within ``memory_budget`` bytes.

    Returns
    -------
    chunk_size : int
        Particles per call of :func:`e_step`.
    keep_scores : bool
        Whether the first pass keeps the scores of the pairs the second may visit
        (counted here as if that were all of them), rather than the second pass
        recomputing the scores of the significant pairs.
    share_transforms : bool
        Whether the rotated references of the whole search fit, so they are made
        once per iteration for all chunks.
    """
    half = box_size * box_size * (box_size // 2 + 1)
    transform_bytes = n_classes * n_rotations * half * 8
    share = transform_bytes <= memory_budget / 4
    available = memory_budget - (transform_bytes if share else 0)
    # Prepared data, the per-pair maxima, log-sums, arguments and kept flags.
    per_particle = half * 8 + n_classes * n_rotations * 21
    per_scores = n_classes * n_rotations * n_shifts * 4
    with_scores = int(available // (per_particle + per_scores))
    if with_scores >= min(n_particles, _MIN_SCORED_CHUNK):
        return max(1, min(n_particles, with_scores)), True, share
    return max(1, min(n_particles, int(available // per_particle))), False, share


class _Lines:
    """The y-lines of the half grid that carry data, and arrays laid out along them.

    A line is a (z, x) column of the half grid; it is live when some voxel on it is
    in an observed set of the settings' masks (band included). A wedge about y
    observes whole lines or none, and the band leaves out the lines beyond its
    radius, so about half the lines of a +-60 degree wedge are live. Pair products
    vanish on the other lines, so they are stored as (m, D, L): y, then the live
    lines, and the window sums skip the rest.
    """

    def __init__(self, mask_arrays, every=False):
        _, d, _, h = mask_arrays.shape
        live = np.ones((d, h), dtype=bool) if every else mask_arrays.any(axis=(0, 2))
        self.d, self.h = d, h
        self.columns = np.flatnonzero(live)
        self.z, self.x = z, x = np.divmod(self.columns, h)
        self.flat = (z[None, :] * d + np.arange(d)[:, None]) * h + x[None, :]
        self.shape = (d, len(self.columns))

    @functools.cached_property
    def _inverse(self) -> np.ndarray:
        """The compact position of every half-grid voxel, -1 off the live lines."""
        inverse = np.full(self.d * self.d * self.h, -1, dtype=np.int64)
        inverse[self.flat.ravel()] = np.arange(self.flat.size)
        return inverse

    def positions(self, flat_index: np.ndarray) -> np.ndarray:
        """Where the half-grid voxels ``flat_index`` (all on live lines) sit in a
        compact array, flattened."""
        out = self._inverse[flat_index]
        if np.any(out < 0):
            raise ValueError("some voxels lie off the live lines")
        return out

    def compact(self, arrays: np.ndarray) -> np.ndarray:
        """(m, D, L), C-contiguous, from half grids (m, D, D, D//2+1)."""
        return np.ascontiguousarray(arrays.reshape(len(arrays), -1)[:, self.flat])

    def expand(self, compact: np.ndarray) -> np.ndarray:
        """The half grids (..., D, D, D//2+1) of compact arrays (..., D, L), zero off the
        lines."""
        d, h = self.d, self.h
        lead = compact.shape[:-2]
        full = np.zeros((*lead, d * d * h), dtype=compact.dtype)
        full[..., self.flat] = compact
        return full.reshape(*lead, d, d, h)


# Posteriors below this are dropped from the float32 shift spreads (see below).
_NEGLIGIBLE_WEIGHT = 2.0**-64


def _single_precision(weights):
    """Posteriors ``weights`` as float32, those below :data:`_NEGLIGIBLE_WEIGHT` set to 0.

    Weights far below a particle's best make subnormal float32 numbers in the
    transforms, which are many times slower: on real posteriors (256 pairs, D = 20,
    L = 3, one thread) the window's spread took 6.1 ms as they were, 6.0 ms with the
    weights below float32's normal range zeroed, 2.0 ms with those below 2^-64 zeroed,
    and 1.9 ms on uniform random weights. A particle has unit mass over at most
    K R T weights, so for K R T < 2^40 what is dropped is below float32's 2^-24 of it.
    """
    return np.where(weights < _NEGLIGIBLE_WEIGHT, 0.0, weights).astype(np.float32)


class _FourierShifts:
    """Sums over the full grid at integer shifts, by batched FFTs of whole volumes.

    ``cross(P)[j, t] = sum_q P_j(q) exp(+2 pi i q.t / D)`` over the full grid (real for
    Hermitian P), and ``spread(g)[j, q] = sum_t g_j(t) exp(+2 pi i q.t / D)`` on the
    half grid; both in the layout of ``_Lines(..., every=True)``, (y, z, x), which the
    transforms treat as a volume with z and y swapped.
    """

    def __init__(self, box_size, shifts, backend):
        d = box_size
        tx, ty, tz = shifts.T
        self.flat = ((ty % d) * d + (tz % d)) * d + (tx % d)
        self.d = d
        self.backend = backend
        # Undoes the orthonormal factor of the transforms.
        self.scale = float(d) ** 1.5

    def cross(self, products):
        d = self.d
        real = self.backend.irfftn(products.reshape(-1, d, d, d // 2 + 1), d)
        return real.reshape(len(products), -1)[:, self.flat].astype(np.float64) * self.scale

    def spread(self, weights):
        d = self.d
        grid = np.zeros((len(weights), d**3), dtype=np.float32)
        grid[:, self.flat] = _single_precision(weights) * np.float32(self.scale)
        spread = np.conj(self.backend.rfftn(grid.reshape(-1, d, d, d)))
        return spread.reshape(len(weights), d, -1)


class _WindowShifts:
    """The sums of :class:`_FourierShifts` for the cube of shifts ``|t|_inf <= L``,
    in the layout of ``lines``.

    Only ``n = 2L + 1`` outputs are needed along each axis, so each transform is three
    matrix products (y over the live lines, z, then the half x axis), the first
    costing ``n / D`` of a dense pass over the live lines; for small cubes this is well
    under the cost of one FFT.
    """

    def __init__(self, lines, max_shift, period=None):
        d = lines.d
        period = d if period is None else period
        t = np.arange(-max_shift, max_shift + 1)
        full = np.fft.fftfreq(d, 1.0 / d)
        half = np.arange(d // 2 + 1)
        self.lines = lines
        self.d, self.n, self.h = d, len(t), d // 2 + 1
        phase = 2j * np.pi / period
        self.full_out = np.exp(phase * np.outer(t, full)).astype(np.complex64)
        self.full_in = np.ascontiguousarray(self.full_out.T)
        # Columns with a Hermitian partner that the half grid omits count twice.
        half_out = np.exp(phase * np.outer(half, t))
        self.half_out = (half_out * hermitian_multiplicity(d)[:, None]).astype(np.complex64)
        self.half_in = np.exp(phase * np.outer(t, half)).astype(np.complex64)

    def cross(self, products):
        p, d, n, h = len(products), self.d, self.n, self.h
        g = np.matmul(self.full_out, products).reshape(p * n, -1)
        # z leads, so that the z sums are one matrix product: numpy's loop over a
        # stack of p n small ones ran 1.2-1.5 times as fast on two threads as on one
        # (it holds the GIL between them), a single product 1.85 times.
        grid = np.empty((d, p * n, h), dtype=np.complex64)
        _scatter_lines(g, self.lines.z, self.lines.x, grid)
        g = self.full_out @ grid.reshape(d, -1)
        g = g.reshape(-1, h) @ self.half_out
        # (z, p, y, x) to the (z, y, x) order of the shifts.
        g = g.reshape(n, p, n, n).transpose(1, 0, 2, 3)
        return g.real.reshape(p, n**3).astype(np.float64)

    def spread(self, weights):
        p, d, n, h = len(weights), self.d, self.n, self.h
        g = _single_precision(weights).reshape(p, n, n, n).transpose(1, 0, 2, 3)
        g = g.astype(np.complex64)
        g = g.reshape(n * p * n, n) @ self.half_in
        g = self.full_in @ g.reshape(n, -1)
        lines = np.empty((p * n, len(self.lines.z)), dtype=np.complex64)
        _gather_lines(g.reshape(d, p * n, h), self.lines.z, self.lines.x, lines)
        return np.matmul(self.full_in, lines.reshape(p, n, -1))


@numba.njit(cache=True, nogil=True)
def _scatter_lines(values, z, x, out):  # pragma: no cover - compiled
    """``out[:] = 0; out[z[j], :, x[j]] = values[:, j]``, without numpy's fancy-index
    overhead."""
    out[...] = 0
    for i in range(values.shape[0]):
        for j in range(z.shape[0]):
            out[z[j], i, x[j]] = values[i, j]


@numba.njit(cache=True, nogil=True)
def _gather_lines(grid, z, x, out):  # pragma: no cover - compiled
    """``out[:, j] = grid[z[j], :, x[j]]``: the inverse of :func:`_scatter_lines`."""
    for i in range(out.shape[0]):
        for j in range(z.shape[0]):
            out[i, j] = grid[z[j], i, x[j]]


def _shift_sums(mask_arrays, shifts, backend, method, period=None):
    """The shift transform for ``method`` ("auto", "fft" or "window") and the
    :class:`_Lines` of its layout."""
    box_size = mask_arrays.shape[-2]
    limit = int(np.max(np.abs(shifts))) if len(shifts) else 0
    cube = len(shifts) == (2 * limit + 1) ** 3 and np.array_equal(
        shifts, shift_window(limit, 0.0)[0]
    )
    cropped = period is not None and period != box_size
    if (method == "window" or cropped) and not cube:
        raise ValueError("the partial-DFT window needs the full cube of shifts of shift_window")
    if cropped and method == "fft":
        raise ValueError("a cropped box (shift_period) needs shift_method 'auto' or 'window'")
    # Iteration time of the window over the FFT's, n = 2L + 1 (N 300, K 2, R 200, one
    # job, D 10-32): 0.21-0.55 where D >= 2.3 n, 0.46-0.72 at D = 1.78-2 n, 1.08 at
    # D = 1.71 n (D 12, L 3).
    if method == "window" or cropped or (
        method == "auto" and cube and 7 * (2 * limit + 1) <= 4 * box_size
    ):
        lines = _Lines(mask_arrays)
        return _WindowShifts(lines, limit, period), lines
    return _FourierShifts(box_size, shifts, backend), _Lines(mask_arrays, every=True)


def log_orientation_prior(chunk: ParticleChunk, search: SearchSpace) -> np.ndarray:
    """log pi(R) of each particle's searched orientations, (n,): the search's own, or
    uniform over the orientations the particle searches in any class."""
    if search.log_orientation_prior is not None:
        return np.full(len(chunk), search.log_orientation_prior)
    if chunk.candidates is None:
        return np.full(len(chunk), -np.log(len(search.rotations)))
    searched = chunk.candidates.reshape(len(chunk), -1, chunk.candidates.shape[-1])
    with np.errstate(divide="ignore"):
        return -np.log(searched.any(axis=1).sum(axis=1))


class _Scorer:
    """Scores of (particle, class, orientation) pairs over the shift window.

    One per kernel call, read by all its threads: it holds the chunk's data in the
    layout of the shift sums (:class:`_Lines`).
    """

    def __init__(self, chunk, model, search, settings):
        d = model.references.shape[-1]
        self.d = d
        self.chunk, self.model, self.search, self.settings = chunk, model, search, settings
        self.backend = FFTBackend(settings.fft_backend, settings.threads)
        self.shift_sums, self.lines = _shift_sums(
            settings.mask_arrays, search.shifts, self.backend, settings.shift_method,
            settings.shift_period,
        )
        self.data = self.lines.compact(chunk.data)
        self.padded = (
            _PaddedTransforms(model.references, settings) if settings.rotation == "fourier"
            else None
        )
        self.inv_two_var = 1.0 / (2.0 * model.sigma**2)
        self.log_shift_prior = search.log_shift_prior
        self.finite_shift_prior = np.where(
            np.isfinite(search.log_shift_prior), search.log_shift_prior, 0.0
        )
        self.shift_sq = np.sum(search.shifts.astype(np.float64) ** 2, axis=1)
        self.mask_weights = self.lines.compact(settings.mask_arrays * hermitian_multiplicity(d))
        # A power of two, so that the batches of any pair list come in few sizes.
        pair_bytes = 8 * self.data[0].size
        self.batch = 1 << max(0, int(np.log2(max(1, _PAIR_BATCH_BYTES // pair_bytes))))
        self.log_orientation_prior = log_orientation_prior(chunk, search)
        # A lower bound of each particle's best score over shifts, raised by the first
        # pass as it goes; a lost update between threads only lowers it.
        self.best_so_far = np.full(len(chunk), -np.inf)

    def masked_power(self, transforms: np.ndarray) -> np.ndarray:
        """``sum_q m w_g |V|^2`` for every mask group and transform: (G, m)."""
        power = np.abs(transforms.reshape(len(transforms), -1)).astype(np.float64) ** 2
        groups = self.mask_weights.reshape(len(self.mask_weights), -1)
        return groups @ power.T

    def pair_batches(self, conj_transforms, candidates):
        """Yield ``(particles, local rotations, cross terms)`` of the searched pairs.

        ``conj_transforms`` holds the conjugated transforms of one class over an
        orientation block; ``candidates`` (n, b) restricts the pairs, None searches all.
        """
        if candidates is None:
            candidates = np.ones((len(self.chunk), len(conj_transforms)), dtype=bool)
        particles, local = np.nonzero(candidates)
        # One buffer for all batches: a fresh one of megabytes per batch had been a
        # page-faulting allocation under the GIL.
        products = np.empty((min(self.batch, len(particles)), *self.data.shape[1:]),
                            dtype=np.complex64)
        for batch in _batches(len(particles), self.batch):
            p, r = particles[batch], local[batch]
            yield p, r, self.gathered_cross(p, r, conj_transforms, products[: len(p)])

    def gathered_cross(self, particles, local, conj_transforms, products=None):
        """Cross terms of the pairs (particles[j], conj_transforms[local[j]]);
        ``products``, if given, is the (m, ...) scratch space of their products."""
        data = self.data
        if products is None:
            products = np.empty((len(particles), *data.shape[1:]), dtype=np.complex64)
        _gathered_products(
            data.reshape(len(data), -1), conj_transforms.reshape(len(conj_transforms), -1),
            particles, local, products.reshape(len(particles), -1),
        )
        return self.shift_sums.cross(products)

    def correlations(self, particles, cross, power):
        """Constrained cross-correlation over O_j for every shift (reference section 4b).

        With DC unobserved both maps have zero mean, so the Pearson correlation
        over the box is the cross term divided by the two masked norms.
        """
        norms = np.sqrt(self.chunk.power[particles] * power)
        with np.errstate(divide="ignore", invalid="ignore"):
            cc = cross / norms[:, None]
        return np.where(norms[:, None] > 0, cc, 0.0)

    def pair_scores(self, k, particles, cross, power, relative):
        """Best score over shifts of each pair, its shift and the log-sum over shifts;
        the scores less their pair's best go to ``relative`` (m, T)."""
        top, arg = _shift_scores(
            cross, self.chunk.power, power, particles, self._offset(k, particles),
            self.log_shift_prior, self.inv_two_var, relative,
        )
        return top, arg, _plus_log_row_sums(top, np.exp(relative))

    def posterior_terms(self, k, particles, relative, top, log_norm):
        """Posteriors ``gamma`` (m, T) of the pairs whose scores are ``relative`` + ``top``
        when each particle's kept mass is ``exp(log_norm)``; their sum per pair, and the
        sums of ``gamma`` times the residual and times ``|t|^2`` over all of them."""
        gamma = np.empty(relative.shape)
        _log_posteriors(relative, top, log_norm[particles], gamma)
        np.exp(gamma, out=gamma)
        mass, residual, shift = _posterior_sums(
            gamma, relative, top, self._offset(k, particles), self.finite_shift_prior,
            self.inv_two_var, self.shift_sq,
        )
        return gamma, mass, residual, shift

    def _offset(self, k, particles):
        """The part of every score of class ``k`` that does not depend on the shift."""
        return self.model.log_class_weights[k] + self.log_orientation_prior[particles]


# Scores and posteriors by compiled passes over each pair's shifts: numpy's dozen
# passes over the (pairs, shifts) arrays had cost as much as the shift sums at D = 16.
# The exponentials stay with numpy, whose vectorised exp is about 9 times faster.
@numba.njit(cache=True, nogil=True)
def _shift_scores(cross, particle_power, power, particles, offset,  # pragma: no cover
                  log_shift_prior, inv_two_var, relative):
    """``relative[j, t]``: the score ``offset[j] + log_shift_prior[t] - (base - 2
    cross[j, t]) inv_two_var`` less the pair's best, where pair j of particle
    ``particles[j]`` has ``base = particle_power[particles[j]] + power[j]``; returns
    the best and its first shift."""
    m, n_shifts = cross.shape
    top = np.empty(m)
    arg = np.zeros(m, dtype=np.int32)
    for j in range(m):
        base = particle_power[particles[j]] + power[j]
        best = -np.inf
        for t in range(n_shifts):
            s = offset[j] + log_shift_prior[t] - (base - 2.0 * cross[j, t]) * inv_two_var
            relative[j, t] = s
            if s > best:
                best, arg[j] = s, t
        top[j] = best
        if np.isfinite(best):
            for t in range(n_shifts):
                relative[j, t] -= best
    return top, arg


@numba.njit(cache=True, nogil=True)
def _plus_log_row_sums(top, values):  # pragma: no cover - compiled
    """``top + log(values.sum(axis=1))``: numpy's small row sums hold the GIL, and ran
    slower on two threads than on one."""
    out = np.empty(len(top))
    for j in range(len(top)):
        total = 0.0
        for t in range(values.shape[1]):
            total += values[j, t]
        out[j] = top[j] + np.log(total)
    return out


@numba.njit(cache=True, nogil=True)
def _log_posteriors(relative, top, log_norm, out):  # pragma: no cover - compiled
    """``out[j, t] = relative[j, t] + top[j] - log_norm[j]``."""
    for j in range(relative.shape[0]):
        for t in range(relative.shape[1]):
            out[j, t] = relative[j, t] + top[j] - log_norm[j]


@numba.njit(cache=True, nogil=True)
def _posterior_sums(gamma, relative, top, offset, finite_shift_prior, inv_two_var,
                    shift_sq):  # pragma: no cover - compiled
    """Per-pair sums of ``gamma``, and the sums of ``gamma`` times the residual behind
    each score (the score inverted; none where it is -inf) and times ``shift_sq``."""
    mass = np.zeros(gamma.shape[0])
    residual = shift = 0.0
    for j in range(gamma.shape[0]):
        for t in range(gamma.shape[1]):
            g = gamma[j, t]
            mass[j] += g
            shift += g * shift_sq[t]
            score = relative[j, t] + top[j]
            if np.isfinite(score):
                residual += g * (offset[j] + finite_shift_prior[t] - score) / inv_two_var
    return mass, residual, shift


@numba.njit(cache=True, nogil=True)
def _run_sums(weighted, data, particles, bounds, out):  # pragma: no cover - compiled
    """``out[i] = sum_j weighted[j] * data[particles[j]]`` over the pairs ``j`` of run
    ``i``, ``bounds[i]:bounds[i + 1]``, in complex128: no gathered copy of the data and
    no product array (2.8 times as fast as numpy's multiply and slice sums, D 24/32)."""
    for i in range(out.shape[0]):
        row = out[i]
        row[:] = 0
        for j in range(bounds[i], bounds[i + 1]):
            a = weighted[j]
            b = data[particles[j]]
            for q in range(row.shape[0]):
                row[q] += a[q] * b[q]


@numba.njit(cache=True, nogil=True)
def _gathered_products(data, transforms, particles, local, out):  # pragma: no cover - compiled
    """``out[j] = data[particles[j]] * transforms[local[j]]`` without the two gathered
    copies numpy makes first: a third of the memory traffic of the sparse searches."""
    for j in range(len(particles)):
        a = data[particles[j]]
        b = transforms[local[j]]
        for i in range(a.shape[0]):
            out[j, i] = a[i] * b[i]


def _block_transforms(scorer, transforms, block, needed):
    """The transforms of a block's ``needed`` (K, b) pairs in the scorer's layout,
    (m, ...) in the order of ``np.flatnonzero(needed)`` (rotated here unless
    ``transforms`` holds them all), their masked power (G, m) and the slots (K, b)
    that index them."""
    rotations = scorer.search.rotations[block]
    if transforms is not None:
        mine = transforms[:, block]
        rotated = scorer.lines.compact(
            mine.reshape(-1, *mine.shape[2:]) if needed.all() else mine[needed]
        )
    elif scorer.padded is not None:
        # Sampled straight into the layout: a sixth of the half grid is observed.
        rotated = scorer.padded.rotated(rotations, needed, scorer.lines)
    else:
        rotated = scorer.lines.compact(
            rotate_block(scorer.model.references, rotations, scorer.settings, needed)
        )
    return rotated, scorer.masked_power(rotated), _slots(needed)


def block_candidates(chunk, block, n_classes):
    """The chunk's candidates in one orientation block, (n, K, b), or None."""
    if chunk.candidates is None:
        return None
    c = chunk.candidates
    c = c[:, None, block] if c.ndim == 2 else c[:, :, block]
    return np.broadcast_to(c, (len(chunk), n_classes, len(block)))


def searched_pairs(candidates, allowed, n_block):
    """(K, b) bool: the (class, orientation) pairs of a block that some particle
    searches, among the classes ``allowed`` (K,) bool."""
    if candidates is None:
        return np.repeat(allowed[:, None], n_block, axis=1)
    return candidates.any(axis=0) & allowed[:, None]


def _block_pairs(scorer, transforms, block, allowed):
    """Yield ``(k, particles, local rotations, cross terms, masked power)`` for the
    pairs of one orientation block that are searched, in the classes ``allowed``
    (K,) bool; only the (class, orientation) pairs some particle searches are rotated."""
    chunk = scorer.chunk
    n_classes = scorer.model.references.shape[0]
    candidates = block_candidates(chunk, block, n_classes)
    needed = searched_pairs(candidates, allowed, len(block))
    if not needed.any():
        return
    rotated, power, slots = _block_transforms(scorer, transforms, block, needed)
    for k in np.flatnonzero(needed.any(axis=1)):
        rows = np.flatnonzero(needed[k])
        searched = None if candidates is None else candidates[:, k, rows]
        conj = np.conj(rotated[slots[k, rows]])
        for p, r, cross in scorer.pair_batches(conj, searched):
            yield k, p, rows[r], cross, power[chunk.group[p], slots[k, rows[r]]]


def _batches(n: int, size: int):
    """Slices covering range(n): full batches of ``size``, then powers of two.

    Each distinct batch size costs one FFTW plan, so the remainder is split into at
    most log2(size) pieces of power-of-two sizes.
    """
    start = 0
    while start < n:
        step = size if n - start >= size else 1 << int(np.log2(n - start))
        yield slice(start, start + step)
        start += step


def index_blocks(n: int, size: int):
    """The indices ``0..n-1`` in consecutive blocks of ``size`` (the last may be
    shorter): the orientation blocks of every E-step backend, the particle chunks
    of the estimator."""
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass
class _BlockScores:
    """What the first pass learns about one orientation block, (n, K, b) each.

    When the settings keep scores for the second pass, ``relative`` (m, T) float32
    holds the scores less their pair's maximum of the m pairs that the second pass
    may visit, and ``slots`` (n, K, b) the row of each of them (-1 for the others).
    """

    block: np.ndarray
    pair_max: np.ndarray
    pair_lse: np.ndarray
    pair_arg: np.ndarray
    relative: np.ndarray | None = None
    slots: np.ndarray | None = None


def _score_block(scorer, block, transforms, keep_scores=False):
    """First pass over one orientation block: per-pair maxima, log-sums and arguments,
    and with ``keep_scores`` the scores the second pass may need."""
    model, search, settings = scorer.model, scorer.search, scorer.settings
    n, n_classes, b = len(scorer.chunk), model.references.shape[0], len(block)
    out = _BlockScores(
        block,
        np.full((n, n_classes, b), -np.inf),
        np.full((n, n_classes, b), -np.inf),
        np.zeros((n, n_classes, b), dtype=np.int32),
    )
    # Scores are kept only for the pairs that the best so far of their particle (over
    # the blocks done, shared by the threads) does not already rule out of the second
    # pass, its best over all blocks being no lower: keeping them all had cost 1.7 GB
    # of fresh pages per iteration at N = 200, D = 32, 15 degrees.
    cut = _log_cut(settings.pruning_threshold) if keep_scores else np.inf
    rows, where = [], []
    allowed = np.isfinite(model.log_class_weights)
    for k, p, r, cross, power in _block_pairs(scorer, transforms, block, allowed):
        relative = np.empty(cross.shape)
        top, arg, lse = scorer.pair_scores(k, p, cross, power, relative)
        kept, flat = _record_pairs(
            k, p, r, top, arg, lse, out.pair_max, out.pair_arg, out.pair_lse,
            scorer.best_so_far, cut,
        )
        if len(kept):
            rows.append(relative[kept].astype(np.float32))
            where.append(flat)
    if keep_scores:
        where = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
        out.relative = (
            np.concatenate(rows) if rows else np.zeros((0, len(search.shifts)), np.float32)
        )
        out.slots = np.full((n, n_classes, b), -1, dtype=np.int64)
        out.slots.flat[where] = np.arange(len(where))
    return out


def _log_cut(threshold):
    """How far above its particle's best score a pair's best must lie for
    :func:`_significant_pairs` to keep it (a negative number of nats).

    At threshold 0 a pair is left out where its posterior underflows next to the best,
    ``exp(pair_max - best) == 0``: from about 745.1 nats below it.
    """
    return np.log(threshold) if threshold > 0 else -746.0


@numba.njit(cache=True, nogil=True)
def _record_pairs(k, particles, local, top, arg, lse, pair_max, pair_arg, pair_lse, best,
                  cut):  # pragma: no cover - compiled
    """Store a batch's per-pair results at ``[particles, k, local]``, raise the
    particles' ``best`` to them, and return the positions in the batch of the pairs
    not ruled out, ``top >= best + cut``, with their flat indices into ``pair_max``.

    Compiled: as numpy's fancy-index assignments and ``maximum.at`` these had held the
    GIL for a tenth of the first pass's time on two threads.
    """
    n_classes, b = pair_max.shape[1], pair_max.shape[2]
    for j in range(len(particles)):
        i = particles[j]
        pair_max[i, k, local[j]] = top[j]
        pair_arg[i, k, local[j]] = arg[j]
        pair_lse[i, k, local[j]] = lse[j]
        best[i] = max(best[i], top[j])
    kept = np.flatnonzero(top >= best[particles] + cut)
    flat = (particles[kept] * n_classes + k) * b + local[kept]
    return kept, flat


@_with_blas_threads
def e_step(
    chunk: ParticleChunk,
    model: Model,
    search: SearchSpace,
    settings: KernelSettings,
    accumulate: bool = True,
    transforms: np.ndarray | None = None,
    progress=None,
    keep_pairs: bool = False,
) -> ChunkResult:
    """Score a chunk of particles against the model; optionally accumulate statistics.

    Orientation blocks are processed in parallel (``settings.n_jobs``), twice when
    accumulating: the second pass needs each particle's best pair over all blocks.

    Parameters
    ----------
    chunk : ParticleChunk
    model : Model
    search : SearchSpace
    settings : KernelSettings
    accumulate : bool, default=True
        Also compute the sufficient statistics (a second pass over the pairs whose
        posterior is not negligible).
    transforms : ndarray of shape (K, R, D, D, D//2+1), optional
        :func:`rotated_transforms` of the model at ``search.rotations``; computed
        block by block here when not given.
    progress : callable, optional
        Called with the fraction of the chunk's work done by each finished block.
    keep_pairs : bool, default=False
        Return the log posterior mass of every pair (``pair_log_mass``), e.g. to
        choose where a finer search looks.

    Returns
    -------
    ChunkResult
    """
    n, n_classes, n_rot = len(chunk), model.references.shape[0], len(search.rotations)
    pair_max = np.full((n, n_classes, n_rot), -np.inf)
    pair_lse = np.full((n, n_classes, n_rot), -np.inf)
    pair_arg = np.zeros((n, n_classes, n_rot), dtype=np.int32)
    blocks = index_blocks(n_rot, settings.orientation_block)
    share = 0.5 / len(blocks) if accumulate else 1.0 / len(blocks)
    first = []
    scorer = _Scorer(chunk, model, search, settings)
    for part in _parallel(settings.n_jobs)(
        delayed(_score_block)(scorer, block, transforms, accumulate and settings.keep_scores)
        for block in blocks
    ):
        pair_max[:, :, part.block] = part.pair_max
        pair_lse[:, :, part.block] = part.pair_lse
        pair_arg[:, :, part.block] = part.pair_arg
        if accumulate:
            first.append(part)
        if progress is not None:
            progress(share)

    result = pair_result(chunk, model, search, pair_max, pair_lse, pair_arg, keep_pairs)
    if accumulate:
        kept, log_norm = kept_pairs(pair_max, pair_lse, settings.pruning_threshold)
        stats = SufficientStatistics.zeros(n_classes, half_grid_shape(model.references.shape[-1]))
        for part in _parallel(settings.n_jobs)(
            delayed(_accumulate_block)(
                scorer, part, kept[:, :, part.block], log_norm, transforms
            )
            for part in first
        ):
            stats = stats + part
            if progress is not None:
                progress(share)
        result.statistics = chunk_totals(stats, chunk, result)
    return result


def pair_result(chunk, model, search, pair_max, pair_lse, pair_arg, keep_pairs=False):
    """The :class:`ChunkResult` (statistics left out) of a chunk's per-pair maxima,
    log-sums over shifts and best shifts, (n, K, R) each."""
    n, n_classes, n_rot = pair_max.shape
    lse = logsumexp(pair_lse.reshape(n, -1), axis=1)
    best = np.argmax(pair_max.reshape(n, -1), axis=1)
    best_class, best_rotation = np.unravel_index(best, (n_classes, n_rot))
    rows = np.arange(n)
    return ChunkResult(
        log_likelihood=lse - chunk.n_observed * np.log(np.sqrt(2.0 * np.pi) * model.sigma),
        class_log_posterior=logsumexp(pair_lse, axis=2) - lse[:, None],
        best_class=best_class.astype(np.int64),
        best_rotation=best_rotation.astype(np.int64),
        best_shift=search.shifts[pair_arg[rows, best_class, best_rotation]].astype(np.int64),
        max_posterior=np.exp(pair_max[rows, best_class, best_rotation] - lse),
        pair_log_mass=pair_lse if keep_pairs else None,
    )


def kept_pairs(pair_max, pair_lse, threshold):
    """The pairs that enter the statistics (n, K, R) and the log of each particle's
    posterior mass over them (n,), by which their posteriors are normalised."""
    n = len(pair_max)
    lse = logsumexp(pair_lse.reshape(n, -1), axis=1)
    kept = _significant_pairs(pair_max, pair_lse, threshold)
    with np.errstate(divide="ignore"):
        kept_mass = np.sum(np.where(kept, np.exp(pair_lse - lse[:, None, None]), 0.0), (1, 2))
        return kept, lse + np.log(kept_mass)


def chunk_totals(stats, chunk, result):
    """``stats`` with the chunk's particle count, observed components and log-likelihood."""
    stats.n_observed = float(np.sum(chunk.n_observed))
    stats.n_particles = len(chunk)
    stats.log_likelihood = float(np.sum(result.log_likelihood))
    return stats


@_with_blas_threads
def correlation_search(
    chunk: ParticleChunk,
    model: Model,
    search: SearchSpace,
    settings: KernelSettings,
    transforms: np.ndarray | None = None,
    progress=None,
) -> ChunkResult:
    """Best (class, orientation, shift) of each particle by constrained cross-correlation.

    The correlation is computed over each particle's own observed set (reference
    section 4b); the shift prior and class weights play no part.

    Returns
    -------
    ChunkResult
        ``max_posterior`` and ``log_likelihood`` hold the best correlation of each
        particle and ``class_log_posterior`` the best correlation with each class;
        ``statistics`` is None.
    """
    n, n_classes = len(chunk), model.references.shape[0]
    best = np.full((n, n_classes), -np.inf)
    best_rotation = np.zeros((n, n_classes), dtype=np.int64)
    best_shift = np.zeros((n, n_classes), dtype=np.int64)
    blocks = index_blocks(len(search.rotations), settings.orientation_block)
    scorer = _Scorer(chunk, model, search, settings)
    # Blocks come back in orientation order and only a strictly better block wins, so
    # ties keep the first maximum in orientation order, as xmipp does.
    for top, rotation, shift in _parallel(settings.n_jobs)(
        delayed(_correlate_block)(scorer, block, transforms) for block in blocks
    ):
        better = top > best
        best[better], best_rotation[better], best_shift[better] = (
            top[better], rotation[better], shift[better]
        )
        if progress is not None:
            progress(1.0 / len(blocks))
    rows = np.arange(n)
    best_class = np.argmax(best, axis=1)
    top = best[rows, best_class]
    return ChunkResult(
        log_likelihood=top,
        class_log_posterior=best,
        best_class=best_class,
        best_rotation=best_rotation[rows, best_class],
        best_shift=search.shifts[best_shift[rows, best_class]].astype(np.int64),
        max_posterior=top,
    )


def _correlate_block(scorer, block, transforms):
    """Best correlation of each (particle, class) in one block, its orientation and shift."""
    n, n_classes, b = len(scorer.chunk), scorer.model.references.shape[0], len(block)
    top = np.full((n, n_classes, b), -np.inf)
    arg = np.zeros((n, n_classes, b), dtype=np.int64)
    allowed = np.ones(n_classes, dtype=bool)
    for k, p, r, cross, power in _block_pairs(scorer, transforms, block, allowed):
        cc = scorer.correlations(p, cross, power)
        top[p, k, r], arg[p, k, r] = cc.max(axis=1), cc.argmax(axis=1)
    first = np.argmax(top, axis=2)[..., None]
    best = np.take_along_axis(top, first, axis=2)[..., 0]
    return best, block[first[..., 0]], np.take_along_axis(arg, first, axis=2)[..., 0]


def _significant_pairs(pair_max, pair_lse, threshold):
    """Pairs whose best posterior over shifts is not negligible next to the particle's best."""
    best = np.max(pair_max, axis=(1, 2), keepdims=True)
    if threshold > 0:
        return pair_max >= best + _log_cut(threshold)
    return np.isfinite(pair_lse) & (np.exp(pair_max - best) > 0)


def _accumulate_block(scorer, first, kept, log_norm, transforms):
    """Second pass over one orientation block: its share of the sufficient statistics.

    Pairs are visited orientation by orientation, so the particle-frame sums of each
    orientation are contiguous runs, added once and rotated back once.
    """
    chunk, model, search, settings = scorer.chunk, scorer.model, scorer.search, scorer.settings
    d, block = scorer.d, first.block
    n_classes = model.references.shape[0]
    stats = SufficientStatistics.zeros(n_classes, half_grid_shape(d))
    if not kept.any():
        return stats
    conj = power = slots = None
    if first.relative is None:
        rotated, power, slots = _block_transforms(scorer, transforms, block, kept.any(axis=0))
        conj = np.conj(rotated)
    # Keyed by (class, orientation): a sparse block keeps only the pairs it visits.
    sums = {}
    mass = np.zeros((len(settings.masks), n_classes, len(block)))
    for k in range(n_classes):
        local, particles = np.nonzero(kept[:, k, :].T)
        for batch in _batches(len(particles), scorer.batch):
            p, r = particles[batch], local[batch]
            if first.relative is None:
                cross = scorer.gathered_cross(p, slots[k, r], conj)
                relative = np.empty(cross.shape)
                top = scorer.pair_scores(
                    k, p, cross, power[chunk.group[p], slots[k, r]], relative
                )[0]
            else:
                relative, top = first.relative[first.slots[p, k, r]], first.pair_max[p, k, r]
            gamma, pair_mass, residual, shift = scorer.posterior_terms(
                k, p, relative, top, log_norm
            )
            stats.class_sums[k] += pair_mass.sum()
            stats.residual_sum += residual
            stats.shift_sum += shift
            np.add.at(mass, (chunk.group[p], k, r), pair_mass)
            weighted = np.ascontiguousarray(scorer.shift_sums.spread(gamma))
            present, starts = np.unique(r, return_index=True)
            parts = np.empty((len(present), *weighted.shape[1:]), dtype=np.complex128)
            _run_sums(
                weighted.reshape(len(p), -1), scorer.data.reshape(len(scorer.data), -1), p,
                np.append(starts, len(r)), parts.reshape(len(present), -1),
            )
            for ri, part in zip(present, parts, strict=True):
                if (k, ri) in sums:
                    sums[k, ri] += part
                else:
                    sums[k, ri] = part
    _rotate_back(stats, sums, mass, search.rotations[block], scorer)
    return stats


def _rotate_back(stats, sums, mass, rotations, scorer):
    """Add the per-orientation sums (in the scorer's layout) to B_k and W_k in the
    reference frame."""
    settings, d = scorer.settings, scorer.d
    used = np.flatnonzero(np.any(mass > 0, axis=(0, 1)))
    inverses = np.swapaxes(rotations[used], 1, 2)
    weights = mass[:, :, used]
    # The observed sets of a whole block in one call per mask group: alone, a rotated
    # mask cost about three times as much (1 ms at D = 32).
    observed = rotated_observed(
        settings, d, inverses, np.flatnonzero(np.any(weights > 0, axis=(1, 2)))
    )
    for g, sets in observed.items():
        _add_observation_counts(stats, weights[g], sets)
    size = math.prod(half_grid_shape(d))
    # Pairs by orientation, so that each orientation's classes are rotated together.
    orientation, classes = np.nonzero(np.any(weights > 0, axis=0).T)
    for batch in _batches(len(classes), _half_grids_per_batch(d)):
        j, k = orientation[batch], classes[batch]
        frames = scorer.lines.expand(
            np.stack([sums[c, r] for c, r in zip(k, used[j], strict=True)], dtype=np.complex64)
        )
        kept = np.zeros((len(k), size), dtype=bool)
        for g, sets in observed.items():
            mine = weights[g, k, j] > 0
            kept[mine] |= sets[j[mine]].reshape(-1, size)
        _add_in_reference_frame(stats, k, frames, j, inverses, kept, settings, scorer.backend)


def _add_observation_counts(stats, weights, sets):
    """``W_k += sum_j weights[k, j] sets[j]`` for the observed sets ``sets`` (b, D, D,
    D//2+1) bool: one matrix product per batch, where numpy's ``add.at`` over the
    classes ran 80 times as slow as a loop (D = 32)."""
    counts = stats.observation_counts.reshape(len(stats.observation_counts), -1)
    for part in _batches(len(sets), _half_grids_per_batch(stats.data_sums.shape[-2])):
        counts += weights[:, part] @ sets[part].reshape(-1, counts.shape[1])


def _half_grids_per_batch(box_size):
    """How many half grids the back-rotations transform at once: a power of two (so
    that all batches share a few FFTW plans) of at most ``_PAIR_BATCH_BYTES`` in
    complex64, and at most ``_BACK_ROTATION_BATCH``."""
    most = _PAIR_BATCH_BYTES // (8 * math.prod(half_grid_shape(box_size)))
    return 1 << int(np.log2(min(_BACK_ROTATION_BATCH, max(1, most))))


def rotated_observed(settings, box_size, inverses, groups):
    """{g: (b, D, D, D//2+1) bool}: the observed sets of the mask groups ``groups``
    turned by each of ``inverses`` (b, 3, 3), band included."""
    return {
        g: settings.masks[g].observed(
            box_size, rotation=inverses, max_resolution=settings.max_resolution
        )
        for g in groups
    }


def _add_in_reference_frame(stats, classes, frames, orientation, inverses, kept, settings,
                            backend):
    """Rotate particle-frame half grids ``frames`` (m, D, D, D//2+1) by
    ``inverses[orientation]`` and add them, on the sets ``kept`` (m, Q) bool, to B of
    ``classes`` (m,). Consecutive frames of one orientation are rotated as one stack, so
    that they share the interpolation weights."""
    d = stats.data_sums.shape[-2]
    volumes = backend.irfftn(frames, d)
    starts = np.flatnonzero(np.diff(orientation, prepend=-1))
    for a, b in zip(starts, np.append(starts[1:], len(orientation)), strict=True):
        volumes[a:b] = rotate_centred(
            volumes[a:b], inverses[orientation[a]], order=settings.interpolation_order
        )
    back = backend.rfftn(volumes)
    # Interpolation leaks a little signal outside the rotated observed sets.
    _masked_add(back.reshape(len(back), -1), kept, classes,
                stats.data_sums.reshape(len(stats.data_sums), -1))


@numba.njit(cache=True, nogil=True)
def _masked_add(values, kept, rows, out):  # pragma: no cover - compiled
    """``out[rows[j]] += values[j]`` where ``kept[j]``: no masked copy, and no gathered
    rows of ``out`` (as its fancy-index addition makes)."""
    for j in range(values.shape[0]):
        row = out[rows[j]]
        for q in range(values.shape[1]):
            if kept[j, q]:
                row[q] += values[j, q]


def hard_statistics(
    chunk: ParticleChunk,
    labels: np.ndarray,
    rotations: np.ndarray,
    shifts: np.ndarray,
    n_classes: int,
    settings: KernelSettings,
) -> SufficientStatistics:
    """Statistics of hard assignments: particle i counts once, in class ``labels[i]``.

    With these, the weighted average of each class is ``B_k / W_k`` where ``W_k``
    exceeds a threshold, as in the constrained cross-correlation baseline and the
    paper's initial references.

    Parameters
    ----------
    chunk : ParticleChunk
    labels : ndarray of shape (n,), int
    rotations : ndarray of shape (n, 3, 3)
        X_i(r) ~ A(R_i^T (r - t_i)).
    shifts : ndarray of shape (n, 3), int
        In voxels of the box of ``settings.shift_period`` when it is set.
    n_classes : int
    settings : KernelSettings
    """
    d = chunk.data.shape[-2]
    # A share of the particles per worker: run once per iteration on the two half
    # sets of a crop, alone it had cost 7% of a local iteration on two cores.
    shares = np.array_split(np.arange(len(chunk)), effective_n_jobs(settings.n_jobs))
    with _blas_threads(settings):
        parts = _parallel(settings.n_jobs)(
            delayed(_hard_share)(chunk, labels, rotations, shifts, share, n_classes, settings)
            for share in shares if len(share)
        )
        stats = sum(parts, SufficientStatistics.zeros(n_classes, half_grid_shape(d)))
    stats.n_observed = float(np.sum(chunk.n_observed))
    stats.n_particles = len(chunk)
    return stats


def _hard_share(chunk, labels, rotations, shifts, share, n_classes, settings):
    """:func:`hard_statistics` of the particles ``share`` (their B, W and class sums)."""
    backend = FFTBackend(settings.fft_backend, settings.threads)
    d = chunk.data.shape[-2]
    # Shifts count voxels of the full box in a Fourier crop.
    period = settings.shift_period or d
    stats = SufficientStatistics.zeros(n_classes, half_grid_shape(d))
    qx, qy, qz = frequency_grid(d)
    for batch in _batches(len(share), _half_grids_per_batch(d)):
        batch = share[batch]
        inverses = np.swapaxes(np.asarray(rotations)[batch], 1, 2)
        observed = np.empty((len(batch), *half_grid_shape(d)), dtype=bool)
        # The observed sets of each mask group in one call, as in _rotate_back.
        for g in np.unique(chunk.group[batch]):
            mine = chunk.group[batch] == g
            observed[mine] = settings.masks[g].observed(
                d, rotation=inverses[mine], max_resolution=settings.max_resolution
            )
        frames = np.empty((len(batch), *half_grid_shape(d)), dtype=np.complex64)
        for j, i in enumerate(batch):
            tx, ty, tz = shifts[i]
            # S_t^-1 multiplies component q by exp(+2 pi i q.t / D).
            frames[j] = chunk.data[i] * np.exp(
                2j * np.pi * (qx * tx + qy * ty + qz * tz) / period
            )
        classes = np.asarray(labels)[batch].astype(np.int64)
        _add_in_reference_frame(
            stats, classes, frames, np.arange(len(batch)), inverses,
            observed.reshape(len(batch), -1), settings, backend,
        )
        _add_observation_counts(stats, np.eye(n_classes)[:, classes], observed)
        stats.class_sums += np.bincount(classes, minlength=n_classes)
    return stats

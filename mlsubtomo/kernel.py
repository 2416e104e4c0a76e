"""The likelihood kernel: scores of every (class, orientation, shift), posteriors, statistics.

For a chunk of particles and the current model this module

1. rotates each reference once per orientation (real space, about the box centre)
   and Fourier transforms it;
2. scores every searched (particle, class, orientation, shift): the cross term
   over all shifts comes from one inverse FFT of ``w_i X_i conj(R A_k)`` per
   (particle, class, orientation), the masked power ``sum_q m w_i |R A_k|^2`` of
   all particles at once from one matrix product per orientation block;
3. normalises with log-sum-exp, giving each particle's log-likelihood, class
   posteriors and best (class, orientation, shift);
4. (``accumulate=True``) accumulates the sufficient statistics of design section 2b
   over the (particle, class, orientation) pairs whose posterior is not negligible
   relative to the particle's best pair, summing per (class, orientation) over the
   chunk before rotating back into the reference frame once per pair.

Only per-pair maxima and log-sums are kept between the two passes, so the memory
of a chunk grows with N K R, not with the number of shifts or the box volume.

Fourier arrays are half grids of volumes whose rotation centre has been moved to
index 0 (:func:`mlsubtomo.transform.centre_for_fft`), so rotating a volume rotates
its transform without a phase ramp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from .fft import FFTBackend, frequency_grid, half_grid_shape, hermitian_multiplicity
from .masks import FullData
from .stats import SufficientStatistics
from .transform import centre_for_fft, rotate_volume, shift_volume, uncentre_from_fft

__all__ = [
    "ChunkResult",
    "KernelSettings",
    "Model",
    "ParticleChunk",
    "SearchSpace",
    "correlation_search",
    "e_step",
    "hard_statistics",
    "band_weights",
    "local_candidates",
    "logsumexp",
    "prepare_particles",
    "to_fourier",
    "to_real",
    "shift_window",
]

# Bytes of scratch memory one batch of pair transforms may use.
_PAIR_BATCH_BYTES = 1 << 26


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
    """

    rotations: np.ndarray
    shifts: np.ndarray
    log_shift_prior: np.ndarray


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
    candidates : ndarray of shape (n, R), bool, or None
        Orientations searched for each particle; None searches all.
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
    fft_backend, threads : str, int
        Passed to :class:`mlsubtomo.fft.FFTBackend`.
    orientation_block : int
        Orientations rotated and scored together.
    """

    masks: list
    mask_arrays: np.ndarray
    max_resolution: float | None = 0.5
    pruning_threshold: float = 0.0
    interpolation_order: int = 1
    fft_backend: str = "pyfftw"
    threads: int = 1
    orientation_block: int = 16


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
    """

    log_likelihood: np.ndarray
    class_log_posterior: np.ndarray
    best_class: np.ndarray
    best_rotation: np.ndarray
    best_shift: np.ndarray
    max_posterior: np.ndarray
    statistics: SufficientStatistics | None = field(default=None)
    rotations: np.ndarray | None = field(default=None)

    @classmethod
    def concatenate(cls, results: list[ChunkResult]) -> ChunkResult:
        """Per-particle results of consecutive chunks joined (statistics left out)."""
        names = (
            "log_likelihood", "class_log_posterior", "best_class", "best_rotation",
            "best_shift", "max_posterior",
        )
        return cls(**{name: np.concatenate([getattr(r, name) for r in results]) for name in names})


def logsumexp(a: np.ndarray, axis) -> np.ndarray:
    """log(sum(exp(a))) along ``axis``; -inf where every entry is -inf, without warnings."""
    top = np.max(a, axis=axis, keepdims=True)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - finite_top), axis=axis, keepdims=True)) + finite_top
    out = np.where(np.isneginf(top), -np.inf, out)
    return np.squeeze(out, axis=axis)


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
    d = volumes.shape[-1]
    backend = FFTBackend(settings.fft_backend, settings.threads)
    multiplicity = hermitian_multiplicity(d)
    if base_shifts is not None:
        pairs = zip(volumes, base_shifts, strict=True)
        volumes = np.stack([shift_volume(v, -t) for v, t in pairs])
    data = backend.rfftn(centre_for_fft(volumes))
    data *= settings.mask_arrays[group]
    power = np.einsum("nzyx,x->n", np.abs(data).astype(np.float64) ** 2, multiplicity)
    counts = np.einsum("gzyx,x->g", settings.mask_arrays.astype(np.float64), multiplicity)
    return ParticleChunk(data, power, counts[group], np.asarray(group))


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


def local_candidates(grid: np.ndarray, centres: np.ndarray, max_angle: float) -> np.ndarray:
    """Grid orientations within ``max_angle`` degrees of each centre: bool (n, R).

    The nearest grid orientation is always included, so no particle is left without one.
    """
    centres_q = Rotation.from_matrix(centres).as_quat()
    grid_q = Rotation.from_matrix(grid).as_quat()
    cos_half = np.clip(np.abs(centres_q @ grid_q.T), 0.0, 1.0)
    angle = np.degrees(2.0 * np.arccos(cos_half))
    near = angle <= max_angle
    near[np.arange(len(centres)), np.argmin(angle, axis=1)] = True
    return near


def rotated_transforms(
    references: np.ndarray, rotations: np.ndarray, settings: KernelSettings
) -> np.ndarray:
    """Centred half-grid transforms of every reference at every rotation, (K, b, ...).

    Computing these once per iteration and passing them to :func:`e_step` saves each
    particle chunk from rotating the references itself.
    """
    backend = FFTBackend(settings.fft_backend, settings.threads)
    k, d = references.shape[0], references.shape[-1]
    rotated = np.empty((k, len(rotations), d, d, d), dtype=np.float32)
    for ki in range(k):
        for ri, matrix in enumerate(rotations):
            rotated[ki, ri] = rotate_volume(
                references[ki], matrix, order=settings.interpolation_order
            )
    return backend.rfftn(centre_for_fft(rotated))


class _Scorer:
    """Scores of (particle, class, orientation) pairs over the shift window."""

    def __init__(self, chunk, model, search, settings, backend):
        d = model.references.shape[-1]
        self.d = d
        self.chunk = chunk
        self.model = model
        self.backend = backend
        tx, ty, tz = search.shifts.T
        self.flat_shift = ((tz % d) * d + (ty % d)) * d + (tx % d)
        self.scale = float(d) ** 1.5
        self.inv_two_var = 1.0 / (2.0 * model.sigma**2)
        self.log_shift_prior = search.log_shift_prior
        self.mask_weights = settings.mask_arrays * hermitian_multiplicity(d)
        # A power of two, so that the batches of any pair list come in few sizes.
        self.batch = 1 << max(0, int(np.log2(max(1, _PAIR_BATCH_BYTES // (12 * d**3)))))
        n_rot = len(search.rotations)
        if chunk.candidates is None:
            self.log_orientation_prior = np.full(len(chunk), -np.log(n_rot))
        else:
            with np.errstate(divide="ignore"):
                self.log_orientation_prior = -np.log(chunk.candidates.sum(axis=1))

    def masked_power(self, transforms: np.ndarray) -> np.ndarray:
        """``sum_q m w_g |V|^2`` for every mask group and transform: (G, K, b)."""
        k, b = transforms.shape[:2]
        power = np.abs(transforms.reshape(k * b, -1)).astype(np.float64) ** 2
        groups = self.mask_weights.reshape(len(self.mask_weights), -1)
        return (groups @ power.T).reshape(-1, k, b)

    def cross(self, particles, transforms):
        """``<X_j, S_t V_j>`` over O_j for every searched shift t: (pairs, T)."""
        product = self.chunk.data[particles] * np.conj(transforms)
        cross = self.backend.irfftn(product, self.d).reshape(len(particles), -1)
        return cross[:, self.flat_shift].astype(np.float64) * self.scale

    def correlations(self, k, particles, transforms, power):
        """Constrained cross-correlation over O_j for every shift (reference section 4b).

        With DC unobserved both maps have zero mean, so the Pearson correlation
        over the box is the cross term divided by the two masked norms.
        """
        norms = np.sqrt(self.chunk.power[particles] * power)
        with np.errstate(divide="ignore", invalid="ignore"):
            cc = self.cross(particles, transforms) / norms[:, None]
        return np.where(norms[:, None] > 0, cc, 0.0), None

    def scores(self, k, particles, transforms, power):
        """Scores and residuals over shifts for pairs (particles[j], transforms[j])."""
        chunk = self.chunk
        cross = self.cross(particles, transforms)
        residual = (chunk.power[particles] + power)[:, None] - 2.0 * cross
        score = (
            self.model.log_class_weights[k]
            + self.log_orientation_prior[particles, None]
            + self.log_shift_prior[None, :]
            - residual * self.inv_two_var
        )
        return score, residual


def _score_all_pairs(chunk, blocks, classes, block_transforms, scorer, score):
    """Yield ``(k, particles, rotations, values)`` for every searched pair, in batches.

    ``score`` is a bound method of the scorer (``scores`` or ``correlations``); each
    orientation block is rotated once and its masked powers computed once.
    """
    for block in blocks:
        particles, local = _pairs(chunk, block)
        if len(particles) == 0:
            continue
        rotated = block_transforms(block)
        power = scorer.masked_power(rotated)
        for k in classes:
            for batch in _batches(len(particles), scorer.batch):
                p, r = particles[batch], local[batch]
                values, _ = score(k, p, rotated[k, r], power[chunk.group[p], k, r])
                yield k, p, block[r], values


def _transform_source(model, search, settings, transforms):
    """A function giving the rotated references of an orientation block."""

    def block_transforms(block):
        if transforms is not None:
            return transforms[:, block]
        return rotated_transforms(model.references, search.rotations[block], settings)

    return block_transforms


def _batches(n: int, size: int):
    """Slices covering range(n): full batches of ``size``, then powers of two.

    Each distinct batch size costs one FFTW plan (made with FFTW_MEASURE), so the
    remainder is split into at most log2(size) pieces of power-of-two sizes.
    """
    start = 0
    while start < n:
        step = size if n - start >= size else 1 << int(np.log2(n - start))
        yield slice(start, start + step)
        start += step


def _pairs(chunk: ParticleChunk, block: np.ndarray):
    """(particle, position-in-block) pairs searched in an orientation block."""
    n = len(chunk)
    if chunk.candidates is None:
        return np.repeat(np.arange(n), len(block)), np.tile(np.arange(len(block)), n)
    return np.nonzero(chunk.candidates[:, block])


def _blocks(n_rotations: int, size: int):
    return [np.arange(s, min(s + size, n_rotations)) for s in range(0, n_rotations, size)]


def e_step(
    chunk: ParticleChunk,
    model: Model,
    search: SearchSpace,
    settings: KernelSettings,
    accumulate: bool = True,
    transforms: np.ndarray | None = None,
) -> ChunkResult:
    """Score a chunk of particles against the model; optionally accumulate statistics.

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

    Returns
    -------
    ChunkResult
    """
    backend = FFTBackend(settings.fft_backend, settings.threads)
    scorer = _Scorer(chunk, model, search, settings, backend)
    n, n_classes, n_rot = len(chunk), model.references.shape[0], len(search.rotations)
    active = np.flatnonzero(np.isfinite(model.log_class_weights))
    pair_max = np.full((n, n_classes, n_rot), -np.inf)
    pair_lse = np.full((n, n_classes, n_rot), -np.inf)
    pair_arg = np.zeros((n, n_classes, n_rot), dtype=np.int32)
    blocks = _blocks(n_rot, settings.orientation_block)
    block_transforms = _transform_source(model, search, settings, transforms)
    for k, p, rot, score in _score_all_pairs(
        chunk, blocks, active, block_transforms, scorer, scorer.scores
    ):
        pair_max[p, k, rot] = score.max(axis=1)
        pair_arg[p, k, rot] = score.argmax(axis=1)
        pair_lse[p, k, rot] = logsumexp(score, axis=1)

    lse = logsumexp(pair_lse.reshape(n, -1), axis=1)
    log_likelihood = lse - chunk.n_observed * np.log(np.sqrt(2.0 * np.pi) * model.sigma)
    class_log_posterior = logsumexp(pair_lse, axis=2) - lse[:, None]
    best = np.argmax(pair_max.reshape(n, -1), axis=1)
    best_class, best_rotation = np.unravel_index(best, (n_classes, n_rot))
    rows = np.arange(n)
    best_shift = search.shifts[pair_arg[rows, best_class, best_rotation]]
    max_posterior = np.exp(pair_max[rows, best_class, best_rotation] - lse)
    result = ChunkResult(
        log_likelihood=log_likelihood,
        class_log_posterior=class_log_posterior,
        best_class=best_class.astype(np.int64),
        best_rotation=best_rotation.astype(np.int64),
        best_shift=best_shift.astype(np.int64),
        max_posterior=max_posterior,
    )
    if accumulate:
        kept = _significant_pairs(pair_max, pair_lse, settings.pruning_threshold)
        with np.errstate(divide="ignore"):
            kept_mass = np.sum(np.where(kept, np.exp(pair_lse - lse[:, None, None]), 0.0), (1, 2))
            log_norm = lse + np.log(kept_mass)
        result.statistics = _accumulate(
            chunk, model, search, settings, scorer, kept, log_norm, blocks, block_transforms
        )
        result.statistics.log_likelihood = float(np.sum(log_likelihood))
    return result


def correlation_search(
    chunk: ParticleChunk,
    model: Model,
    search: SearchSpace,
    settings: KernelSettings,
    transforms: np.ndarray | None = None,
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
    backend = FFTBackend(settings.fft_backend, settings.threads)
    scorer = _Scorer(chunk, model, search, settings, backend)
    n, n_classes, n_rot = len(chunk), model.references.shape[0], len(search.rotations)
    best = np.full((n, n_classes), -np.inf)
    best_rotation = np.zeros((n, n_classes), dtype=np.int64)
    best_shift = np.zeros((n, n_classes), dtype=np.int64)
    blocks = _blocks(n_rot, settings.orientation_block)
    block_transforms = _transform_source(model, search, settings, transforms)
    for k, p, rot, cc in _score_all_pairs(
        chunk, blocks, range(n_classes), block_transforms, scorer, scorer.correlations
    ):
        top, arg = cc.max(axis=1), cc.argmax(axis=1)
        # Ties keep the first maximum, in orientation order, as xmipp does.
        for j in np.flatnonzero(top > best[p, k]):
            i = p[j]
            if top[j] > best[i, k]:
                best[i, k], best_rotation[i, k], best_shift[i, k] = top[j], rot[j], arg[j]
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


def _significant_pairs(pair_max, pair_lse, threshold):
    """Pairs whose best posterior over shifts is not negligible next to the particle's best."""
    best = np.max(pair_max, axis=(1, 2), keepdims=True)
    if threshold > 0:
        return pair_max >= best + np.log(threshold)
    return np.isfinite(pair_lse) & (np.exp(pair_max - best) > 0)


def _accumulate(chunk, model, search, settings, scorer, kept, log_norm, blocks, block_transforms):
    """Second pass: the sufficient statistics over the significant pairs."""
    backend = scorer.backend
    d = scorer.d
    half = half_grid_shape(d)
    n_classes = model.references.shape[0]
    stats = SufficientStatistics.zeros(n_classes, half)
    stats.n_observed = float(np.sum(chunk.n_observed))
    stats.n_particles = len(chunk)
    n_groups = len(settings.masks)
    shift_sq = np.sum(search.shifts.astype(np.float64) ** 2, axis=1)

    for block in blocks:
        block_kept = kept[:, :, block]
        if not block_kept.any():
            continue
        rotated = block_transforms(block)
        power = scorer.masked_power(rotated)
        sums = np.zeros((n_classes, len(block), *half), dtype=np.complex128)
        mass = np.zeros((n_groups, n_classes, len(block)))
        for k in range(n_classes):
            particles, local = np.nonzero(block_kept[:, k, :])
            for batch in _batches(len(particles), scorer.batch):
                p, r = particles[batch], local[batch]
                score, residual = scorer.scores(k, p, rotated[k, r], power[chunk.group[p], k, r])
                gamma = np.exp(score - log_norm[p, None])
                pair_mass = gamma.sum(axis=1)
                stats.class_sums[k] += pair_mass.sum()
                stats.residual_sum += float(np.sum(gamma * residual))
                stats.shift_sum += float(np.sum(gamma @ shift_sq))
                np.add.at(mass, (chunk.group[p], k, r), pair_mass)
                sums[k] += _shift_back_sums(gamma, p, r, len(block), chunk, scorer, backend)
        _rotate_back(stats, sums, mass, search.rotations[block], settings, backend, d)
    return stats


def _shift_back_sums(gamma, particles, local, n_block, chunk, scorer, backend):
    """``sum_j sum_t gamma_j(t) S_t^-1 (w X)_j`` grouped by orientation in the block.

    ``sum_t gamma(t) exp(+2 pi i q.t / D)`` is ``D^1.5 conj(rfftn(g))`` for the real
    map g holding gamma at the shift positions.
    """
    d = scorer.d
    grid = np.zeros((len(particles), d**3), dtype=np.float32)
    grid[:, scorer.flat_shift] = gamma * scorer.scale
    weighted = np.conj(backend.rfftn(grid.reshape(-1, d, d, d)))
    weighted *= chunk.data[particles]
    # Sum the pairs of each orientation: sort by orientation, add contiguous runs.
    order = np.argsort(local, kind="stable")
    present, starts = np.unique(local[order], return_index=True)
    sums = np.zeros((n_block, *chunk.data.shape[1:]), dtype=np.complex128)
    sums[present] = np.add.reduceat(weighted[order], starts, axis=0, dtype=np.complex128)
    return sums


def _rotate_back(stats, sums, mass, rotations, settings, backend, d):
    """Add the per-orientation sums to B_k and W_k in the reference frame."""
    n_groups, n_classes, n_block = mass.shape
    for r in range(n_block):
        if not np.any(mass[:, :, r] > 0):
            continue
        inverse = rotations[r].T
        rotated_masks = {
            g: settings.masks[g].observed(
                d, rotation=inverse, max_resolution=settings.max_resolution
            )
            for g in range(n_groups)
            if np.any(mass[g, :, r] > 0)
        }
        for k in range(n_classes):
            if np.any(mass[:, k, r] > 0):
                counts = sum(mass[g, k, r] * m for g, m in rotated_masks.items())
                _add_in_reference_frame(stats, k, sums[k, r], counts, inverse, settings, backend)


def _add_in_reference_frame(stats, k, particle_frame_sum, counts, inverse, settings, backend):
    """Rotate a particle-frame sum by ``inverse`` and add it, with its counts, to class k."""
    d = stats.data_sums.shape[-2]
    volume = uncentre_from_fft(backend.irfftn(particle_frame_sum, d))
    back = rotate_volume(volume, inverse, order=settings.interpolation_order)
    # Interpolation leaks a little signal outside the rotated observed sets.
    stats.data_sums[k] += backend.rfftn(centre_for_fft(back)) * (counts > 0)
    stats.observation_counts[k] += counts


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
    n_classes : int
    settings : KernelSettings
    """
    backend = FFTBackend(settings.fft_backend, settings.threads)
    d = chunk.data.shape[-2]
    stats = SufficientStatistics.zeros(n_classes, half_grid_shape(d))
    stats.n_observed = float(np.sum(chunk.n_observed))
    stats.n_particles = len(chunk)
    qx, qy, qz = frequency_grid(d)
    for i in range(len(chunk)):
        tx, ty, tz = shifts[i]
        # S_t^-1 multiplies component q by exp(+2 pi i q.t / D).
        phase = np.exp(2j * np.pi * (qx * tx + qy * ty + qz * tz) / d)
        inverse = np.asarray(rotations[i]).T
        counts = settings.masks[chunk.group[i]].observed(
            d, rotation=inverse, max_resolution=settings.max_resolution
        ).astype(np.float64)
        _add_in_reference_frame(
            stats, int(labels[i]), chunk.data[i] * phase, counts, inverse, settings, backend
        )
        stats.class_sums[int(labels[i])] += 1.0
    return stats

"""The E-step of the likelihood kernel on a CUDA GPU, through CuPy.

:func:`e_step` takes and returns what :func:`mlsubtomo.kernel.e_step` does, and
computes the same quantities (design section 2b) with array operations that map onto
a GPU's strengths, where the CPU kernel uses compiled loops:

- only the Fourier components some mask observes are kept, as (n, Q) arrays;
- the cross terms of every (particle, class, orientation) over the shift window are
  one matrix product with the phases ``exp(+2 pi i q.t / P)`` (Q, T), so any set of
  shifts, in a Fourier crop too (``shift_period``), costs Q T per pair;
- every pair of an orientation block is scored at once, twice when accumulating:
  the second pass recomputes the scores rather than keeping them;
- the particle-frame sums are rotated back into the reference frame on the device
  (``cupyx.scipy.ndimage.affine_transform``, the interpolation of
  :func:`mlsubtomo.transform.rotate_centred`).

The references are rotated on the CPU, exactly as the CPU kernel rotates them (the
caller usually does this once per iteration, :func:`mlsubtomo.kernel.rotated_transforms`),
and so are the observed sets that the back-rotated sums are counted on.

The array module is a parameter: with NumPy (and SciPy's ndimage) the same code runs
on the CPU, which is how the test suite checks it against the CPU kernel on machines
without a GPU.
"""

from __future__ import annotations

import numpy as np

from . import kernel
from .fft import frequency_grid, half_grid_shape, hermitian_multiplicity
from .stats import SufficientStatistics
from .transform import affine_parameters, boundary_index

__all__ = ["cuda_array_module", "e_step"]

# Bytes of device memory the temporaries of one batch of pairs may take. Per pair they
# hold the products, the spread sums and an intermediate of their sum (Q each,
# complex64) and about a dozen arrays over the shifts (scores, residuals, posteriors
# and their intermediates, T each, 8 bytes): with NumPy as the array module, the peak
# of an E-step (D = 32, 40 particles, 48 orientations) came within that estimate.
_BATCH_BYTES = 1 << 29
# Bytes of device memory the rotated references of the first pass may keep for the
# second, rather than being rotated (on the CPU) and copied again.
_KEPT_BYTES = 1 << 31


def cuda_array_module():
    """CuPy, once a CUDA device has been found; a clear error when there is none."""
    try:
        import cupy
    except ImportError as error:
        raise ImportError(
            "device='gpu' needs CuPy: install the 'gpu' extra (pip install 'mlsubtomo[gpu]') "
            "or a CuPy build for your CUDA version"
        ) from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        raise RuntimeError(f"device='gpu': CuPy finds no usable CUDA device ({error})") from error
    if count == 0:
        raise RuntimeError("device='gpu': CuPy finds no CUDA device")
    return cupy


def _ndimage(xp):
    if xp is np:
        from scipy import ndimage
    else:
        from cupyx.scipy import ndimage
    return ndimage


def _host(a):
    """A NumPy copy of a device array (NumPy arrays pass through)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


class _DeviceProblem:
    """A chunk, the model and the search on the device, in the compact layout of the
    components that some mask observes."""

    def __init__(self, chunk, model, search, settings, xp):
        d = model.references.shape[-1]
        self.xp, self.d, self.settings = xp, d, settings
        self.search, self.model = search, model
        self.n_classes = model.references.shape[0]
        observed = settings.mask_arrays.any(axis=0)
        self.where = np.flatnonzero(observed)
        multiplicity = np.broadcast_to(hermitian_multiplicity(d), observed.shape).ravel()
        self.weights = xp.asarray(
            settings.mask_arrays.reshape(len(settings.mask_arrays), -1)[:, self.where]
            * multiplicity[self.where], dtype=xp.float32,
        )
        self.multiplicity = xp.asarray(multiplicity[self.where], dtype=xp.float32)
        self.data = xp.asarray(chunk.data.reshape(len(chunk), -1)[:, self.where])
        self.power = xp.asarray(chunk.power, dtype=xp.float64)
        self.group = xp.asarray(chunk.group)
        self.groups = xp.asarray(
            np.eye(len(settings.mask_arrays))[chunk.group], dtype=xp.float64
        )
        offset = model.log_class_weights[None, :] + kernel.log_orientation_prior(
            chunk, search
        )[:, None]
        self.offset = xp.asarray(offset, dtype=xp.float64)
        self.chunk = chunk
        self.allowed = np.isfinite(model.log_class_weights)
        self.log_shift_prior = xp.asarray(search.log_shift_prior, dtype=xp.float64)
        self.shift_sq = xp.asarray(np.sum(search.shifts.astype(np.float64) ** 2, axis=1))
        self.inv_two_var = 1.0 / (2.0 * model.sigma**2)
        period = settings.shift_period or d
        q = np.stack([np.broadcast_to(f, observed.shape).ravel()[self.where]
                      for f in frequency_grid(d)], axis=1)
        self.phases = xp.asarray(
            np.exp(2j * np.pi * (q @ np.asarray(search.shifts, dtype=np.float64).T) / period),
            dtype=xp.complex64,
        )
        self.kept, self.room = {}, _KEPT_BYTES
        n_pair_bytes = 24 * len(self.where) + 96 * len(search.shifts)
        self.batch = max(1, _BATCH_BYTES // (n_pair_bytes * self.n_classes
                                             * settings.orientation_block))

    def block_terms(self, block, transforms):
        """What the scores of an orientation block need of its rotated references:
        their compact conjugates times the Hermitian multiplicity (K b, Q) and their
        masked power per mask group (G, K b). The pairs nobody searches are not
        rotated (zero). The first pass's are kept for the second while they fit in
        ``_KEPT_BYTES``."""
        key = int(block[0])
        if key in self.kept:
            return self.kept[key]
        xp, k, b = self.xp, self.n_classes, len(block)
        candidates = kernel.block_candidates(self.chunk, block, k)
        needed = kernel.searched_pairs(candidates, self.allowed, b)
        rotated = xp.zeros((k * b, len(self.where)), dtype=xp.complex64)
        if needed.any():
            self._fill(rotated, block, needed, transforms)
        power = (self.weights @ (xp.abs(rotated) ** 2).T).astype(xp.float64)
        terms = xp.conj(rotated) * self.multiplicity, power
        size = sum(a.nbytes for a in terms)
        if size <= self.room:
            self.kept[key] = terms
            self.room -= size
        return terms

    def _fill(self, out, block, needed, transforms):
        xp = self.xp
        if transforms is not None:
            mine = transforms[:, block][needed]
        else:
            mine = kernel.rotate_block(
                self.model.references, self.search.rotations[block], self.settings, needed
            )
        out[xp.asarray(np.flatnonzero(needed))] = xp.asarray(
            mine.reshape(len(mine), -1)[:, self.where]
        )

    def scores(self, particles, block, terms):
        """Scores (m, K, b, T) of the particles ``particles`` (a slice) against the
        block's :meth:`block_terms`, -inf where not searched, and the residual norms
        ``||X - S_t R A||^2`` behind them."""
        xp = self.xp
        conj, power = terms
        k, b = self.n_classes, len(block)
        data = self.data[particles]
        products = data[:, None, :] * conj[None]
        cross = (products.reshape(-1, conj.shape[1]) @ self.phases).real.astype(xp.float64)
        cross = cross.reshape(len(data), k, b, -1)
        group = self.group[particles]
        base = self.power[particles, None, None] + power[group].reshape(len(data), k, b)
        residual = base[..., None] - 2.0 * cross
        scores = (self.offset[particles, :, None, None] + self.log_shift_prior
                  - residual * self.inv_two_var)
        searched = xp.asarray(self.allowed)[None, :, None]
        candidates = kernel.block_candidates(self.chunk, block, k)
        if candidates is not None:
            searched = searched & xp.asarray(np.ascontiguousarray(candidates[particles]))
        return xp.where(searched[..., None], scores, -xp.inf), residual


def _pair_summaries(xp, scores):
    """Per-pair maximum over shifts, its first shift and the log-sum, (m, K, b) each."""
    return scores.max(axis=-1), scores.argmax(axis=-1), kernel.logsumexp(scores, -1, xp)


def e_step(
    chunk,
    model,
    search,
    settings,
    accumulate: bool = True,
    transforms: np.ndarray | None = None,
    progress=None,
    keep_pairs: bool = False,
    array_module=None,
):
    """:func:`mlsubtomo.kernel.e_step` on a GPU.

    Parameters
    ----------
    chunk, model, search, settings, accumulate, transforms, progress, keep_pairs
        As for :func:`mlsubtomo.kernel.e_step`; ``settings.n_jobs`` and
        ``settings.keep_scores`` play no part (the device runs one block at a time).
    array_module : module, optional
        CuPy (the default, :func:`cuda_array_module`) or NumPy.

    Returns
    -------
    ChunkResult
        On the host, as NumPy arrays.
    """
    xp = cuda_array_module() if array_module is None else array_module
    problem = _DeviceProblem(chunk, model, search, settings, xp)
    n, n_classes, n_rot = len(chunk), problem.n_classes, len(search.rotations)
    pair_max = np.full((n, n_classes, n_rot), -np.inf)
    pair_lse = np.full((n, n_classes, n_rot), -np.inf)
    pair_arg = np.zeros((n, n_classes, n_rot), dtype=np.int32)
    blocks = kernel.index_blocks(n_rot, settings.orientation_block)
    share = 0.5 / len(blocks) if accumulate else 1.0 / len(blocks)
    batches = [slice(s, min(s + problem.batch, n)) for s in range(0, n, problem.batch)]
    for block in blocks:
        terms = problem.block_terms(block, transforms)
        for p in batches:
            scores, _ = problem.scores(p, block, terms)
            top, arg, lse = (_host(a) for a in _pair_summaries(xp, scores))
            pair_max[p, :, block], pair_arg[p, :, block], pair_lse[p, :, block] = top, arg, lse
        if progress is not None:
            progress(share)
    result = kernel.pair_result(chunk, model, search, pair_max, pair_lse, pair_arg, keep_pairs)
    if accumulate:
        kept, log_norm = kernel.kept_pairs(pair_max, pair_lse, settings.pruning_threshold)
        stats = _statistics(problem, blocks, batches, kept, log_norm, transforms, progress,
                            share)
        result.statistics = kernel.chunk_totals(stats, chunk, result)
    return result


def _statistics(problem, blocks, batches, kept, log_norm, transforms, progress, share):
    """The second pass: the sufficient statistics of the ``kept`` pairs."""
    xp, d, settings = problem.xp, problem.d, problem.settings
    n_classes = problem.n_classes
    stats = SufficientStatistics.zeros(n_classes, half_grid_shape(d))
    data_sums = xp.zeros((n_classes, *half_grid_shape(d)), dtype=xp.complex128)
    counts_sums = xp.zeros((n_classes, *half_grid_shape(d)), dtype=xp.float64)
    class_sums = xp.zeros(n_classes, dtype=xp.float64)
    residual_sum = shift_sum = 0.0
    log_norm = xp.asarray(log_norm)
    for block in blocks:
        mine = kept[:, :, block]
        if not mine.any():
            if progress is not None:
                progress(share)
            continue
        terms = problem.block_terms(block, transforms)
        sums = xp.zeros((n_classes, len(block), len(problem.where)), dtype=xp.complex128)
        mass = xp.zeros((len(settings.mask_arrays), n_classes, len(block)), dtype=xp.float64)
        for p in batches:
            scores, residual = problem.scores(p, block, terms)
            gamma = xp.where(
                xp.asarray(mine[p])[..., None],
                xp.exp(scores - log_norm[p, None, None, None]), 0.0,
            )
            pair_mass = gamma.sum(axis=-1)
            class_sums += pair_mass.sum(axis=(0, 2))
            residual_sum += float(xp.sum(gamma * residual))
            shift_sum += float(xp.sum(gamma @ problem.shift_sq))
            mass += xp.einsum("ig,ikb->gkb", problem.groups[p], pair_mass)
            # sum_t gamma(t) exp(+2 pi i q.t / P): the posterior-weighted shift back.
            spread = gamma.astype(xp.complex64) @ problem.phases.T
            sums += xp.einsum("ikbq,iq->kbq", spread, problem.data[p])
        _rotate_back(problem, data_sums, counts_sums, sums, _host(mass),
                     problem.search.rotations[block])
        if progress is not None:
            progress(share)
    stats.data_sums = _host(data_sums)
    stats.observation_counts = _host(counts_sums)
    stats.class_sums = _host(class_sums)
    stats.residual_sum = residual_sum
    stats.shift_sum = shift_sum
    return stats


def _rotate_back(problem, data_sums, counts_sums, sums, mass, rotations):
    """Add a block's particle-frame sums (K, b, Q) to B_k, and the mass-weighted
    observed sets to W_k, in the reference frame.

    The pairs with posterior mass go through the transforms as one stack; only the
    interpolation is called volume by volume (it takes one 3D array at a time).
    """
    xp, d, settings = problem.xp, problem.d, problem.settings
    ndimage = _ndimage(xp)
    order = settings.interpolation_order
    classes, local = np.nonzero(np.any(mass > 0, axis=0))
    if len(local) == 0:
        return
    used, slot = np.unique(local, return_inverse=True)
    inverses = np.swapaxes(rotations[used], 1, 2)
    groups = np.flatnonzero(np.any(mass[:, classes, local] > 0, axis=1))
    observed = kernel.rotated_observed(settings, d, inverses, groups)
    half = half_grid_shape(d)
    m = len(classes)
    grid = xp.zeros((m, int(np.prod(half))), dtype=xp.complex128)
    grid[:, xp.asarray(problem.where)] = sums[xp.asarray(classes), xp.asarray(local)]
    axes = (1, 2, 3)
    volumes = xp.fft.irfftn(grid.reshape(m, *half), s=(d, d, d), axes=axes, norm="ortho")
    volumes = xp.roll(volumes, (d // 2,) * 3, axis=axes)
    outside = _host(volumes.reshape(m, -1)[:, xp.asarray(boundary_index(d, False))].mean(1))
    back = xp.empty_like(volumes)
    for i in range(m):
        matrix, offset = affine_parameters(inverses[slot[i]], d)
        ndimage.affine_transform(
            volumes[i], xp.asarray(matrix), offset=tuple(offset), output=back[i], order=order,
            mode="grid-constant", cval=float(outside[i]), prefilter=order > 1,
        )
    back = xp.fft.rfftn(xp.roll(back, (-(d // 2),) * 3, axis=axes), axes=axes, norm="ortho")
    counts = xp.zeros((m, *half), dtype=xp.float64)
    for g in groups:
        counts += xp.asarray(mass[g, classes, local])[:, None, None, None] * xp.asarray(
            observed[g][slot])
    # Interpolation leaks a little signal outside the rotated observed sets.
    back *= counts > 0
    for k in np.unique(classes):
        mine = xp.asarray(np.flatnonzero(classes == k))
        data_sums[k] += back[mine].sum(axis=0)
        counts_sums[k] += counts[mine].sum(axis=0)

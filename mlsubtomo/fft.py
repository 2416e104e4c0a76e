"""Orthonormal real-to-complex FFTs over the last three axes, and the half grid.

Every Fourier array in mlsubtomo lives on the half grid ``(D, D, D//2 + 1)`` produced
by ``rfftn`` of a ``[z, y, x]`` volume, with the orthonormal normalisation, so that
the squared norm over the full grid equals the real-space sum of squares.

Two backends share one interface: pyFFTW (plans made with ``FFTW_ESTIMATE`` and
cached per process, keyed by shape, direction and thread count, so that joblib
workers each build their own) and ``scipy.fft``.

``FFTW_ESTIMATE`` rather than ``FFTW_MEASURE``: a measured plan is chosen by timing,
so two processes could pick different algorithms, whose round-off differs; at SNR 0.01
that was enough for two fits with the same ``random_state`` to end one particle
apart. Estimated plans are the same in every process, and on this project's sizes
they were as fast (32^3 and 28^3, batches of 2 and 16: within 2% either way).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import scipy.fft

__all__ = [
    "BACKENDS",
    "FFTBackend",
    "frequency_grid",
    "half_grid_shape",
    "hermitian_multiplicity",
]

BACKENDS = ("pyfftw", "scipy")

_PLANS: dict = {}
_PLAN_LOCK = threading.Lock()


def half_grid_shape(box_size: int) -> tuple[int, int, int]:
    """Shape ``(D, D, D//2 + 1)`` of the half grid of a cubic box of side ``D``."""
    return (box_size, box_size, box_size // 2 + 1)


def frequency_grid(box_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer frequencies ``(qx, qy, qz)`` in Fourier pixels on the half grid.

    Each is a float64 array broadcastable to ``half_grid_shape(box_size)``:
    ``qz`` varies along axis 0, ``qy`` along axis 1 and ``qx`` (non-negative)
    along axis 2.
    """
    d = int(box_size)
    full = np.fft.fftfreq(d, 1.0 / d)
    qz = full.reshape(d, 1, 1)
    qy = full.reshape(1, d, 1)
    qx = np.arange(d // 2 + 1, dtype=np.float64).reshape(1, 1, d // 2 + 1)
    return qx, qy, qz


def hermitian_multiplicity(box_size: int) -> np.ndarray:
    """Weight of each half-grid column in a sum over the full grid.

    A column ``qx`` with a Hermitian partner that the half grid omits counts twice;
    ``qx = 0`` and, for even ``D``, ``qx = D/2`` count once. Shape ``(D//2 + 1,)``.
    """
    d = int(box_size)
    m = np.full(d // 2 + 1, 2.0)
    m[0] = 1.0
    if d % 2 == 0:
        m[-1] = 1.0
    return m


def _check_threads(threads) -> int:
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


class FFTBackend:
    """Batched orthonormal ``rfftn``/``irfftn`` over the last three axes.

    Parameters
    ----------
    name : {"pyfftw", "scipy"}, default="pyfftw"
        Which library computes the transforms.
    threads : int, default=1
        Threads used by one transform.

    Notes
    -----
    Real input is cast to float32 and complex input to complex64; outputs are
    float32 and complex64. Inputs are never modified, and each call returns a new
    array unless an ``out`` array is passed. The object holds only its name and
    thread count, so it pickles cheaply; pyFFTW plans live in a per-process cache
    and may be shared by Python threads (each concurrent caller gets a plan of its own).
    """

    def __init__(self, name: str = "pyfftw", threads: int = 1):
        if name not in BACKENDS:
            raise ValueError(f"name must be one of {BACKENDS}, got {name!r}")
        self.name = name
        self.threads = _check_threads(threads)

    def __repr__(self) -> str:
        return f"FFTBackend(name={self.name!r}, threads={self.threads})"

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, FFTBackend)
            and other.name == self.name
            and other.threads == self.threads
        )

    def __hash__(self) -> int:
        return hash((self.name, self.threads))

    def rfftn(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Forward transform of real ``(..., D, D, D)`` to complex ``(..., D, D, D//2+1)``.

        Parameters
        ----------
        x : array-like of shape (..., D, D, D)
            Real volumes; left unchanged.
        out : ndarray of shape (..., D, D, D//2+1), complex64, optional
            C-contiguous array to write the result into (and return). Reusing one
            avoids allocating fresh memory per call; with pyFFTW it must also be
            SIMD-aligned (``pyfftw.empty_aligned``).

        Returns
        -------
        ndarray, complex64
            ``out`` if given, otherwise a new array.
        """
        x = np.asarray(x, dtype=np.float32)
        _check_cubic(x.shape)
        out_shape = x.shape[:-1] + (x.shape[-1] // 2 + 1,)
        if self.name == "scipy":
            result = scipy.fft.rfftn(x, axes=(-3, -2, -1), norm="ortho", workers=self.threads)
            if out is None:
                return result.astype(np.complex64, copy=False)
            _check_out(out, out_shape, np.complex64, None)
            out[...] = result
            return out
        with _plan("forward", x.shape, self.threads) as plan:
            if out is None:
                out = _empty_aligned(out_shape, np.complex64)
            else:
                _check_out(out, out_shape, np.complex64, plan.fftw)
            if (
                x.strides != plan.fftw.input_strides
                or not _aligned(x, plan.fftw.input_alignment)
                or np.may_share_memory(x, out)
            ):
                # Hand pyFFTW an array it reads as-is: its own fallback would copy into
                # the array of its previous call, which may belong to another caller.
                x = _aligned_copy(x)
            plan.execute(x, out)
        return out

    def irfftn(self, x: np.ndarray, box_size: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inverse transform of complex ``(..., D, D, D//2+1)`` to real ``(..., D, D, D)``.

        Parameters
        ----------
        x : array-like of shape (..., D, D, D//2+1)
            Half-grid transforms; left unchanged.
        box_size : int
            D, which the half grid does not determine.
        out : ndarray of shape (..., D, D, D), float32, optional
            C-contiguous array to write the result into (and return); with pyFFTW it
            must also be SIMD-aligned (``pyfftw.empty_aligned``).

        Returns
        -------
        ndarray, float32
            ``out`` if given, otherwise a new array.
        """
        x = np.asarray(x, dtype=np.complex64)
        d = int(box_size)
        if x.shape[-3:] != half_grid_shape(d):
            raise ValueError(
                f"x has trailing shape {x.shape[-3:]}, expected the half grid "
                f"{half_grid_shape(d)} of box_size {d}"
            )
        shape = x.shape[:-3] + (d, d, d)
        if self.name == "scipy":
            result = scipy.fft.irfftn(
                x, s=(d, d, d), axes=(-3, -2, -1), norm="ortho", workers=self.threads
            )
            if out is None:
                return result.astype(np.float32, copy=False)
            _check_out(out, shape, np.float32, None)
            out[...] = result
            return out
        with _plan("backward", shape, self.threads) as plan:
            if out is None:
                out = _empty_aligned(shape, np.float32)
            else:
                _check_out(out, shape, np.float32, plan.fftw)
            # Multi-dimensional c2r transforms destroy their input: the plan works on a
            # private copy (scaled on the way), so x is left intact.
            plan.execute(x, out)
        return out


def _check_cubic(shape) -> None:
    if len(shape) < 3 or not (shape[-1] == shape[-2] == shape[-3]):
        raise ValueError(f"volumes must be cubic in their last three axes, got shape {shape}")


def _check_out(out, shape, dtype, fftw) -> None:
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ValueError(f"out must be a {np.dtype(dtype)} array of shape {shape}, got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    if fftw is not None and (
        out.strides != fftw.output_strides or not _aligned(out, fftw.output_alignment)
    ):
        raise ValueError(
            "out must be SIMD-aligned for pyFFTW: allocate it with pyfftw.empty_aligned"
        )


def _aligned(a: np.ndarray, alignment: int) -> bool:
    # Not a.ctypes.data: building the ctypes object held the GIL for longer than
    # some of the transforms take.
    return a.__array_interface__["data"][0] % alignment == 0


def _empty_aligned(shape, dtype):
    import pyfftw

    return pyfftw.empty_aligned(shape, dtype=dtype)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    b = _empty_aligned(a.shape, a.dtype)
    b[...] = a
    return b


class _Plan:
    """A pyFFTW plan with its own buffers and its orthonormal factor.

    ``pyfftw.FFTW`` keeps the arrays of its last call, and its ``__call__`` is not
    thread-safe (it points the plan at new arrays, then executes). A plan therefore
    serves one caller at a time (:func:`_plan` lends it out), and :meth:`execute`
    points it back at its own buffers afterwards, so that no caller's array is kept
    alive or written to by a later call.
    """

    def __init__(self, fftw, src, dst, forward: bool):
        self.fftw = fftw
        self.src = src
        self.dst = dst
        self.forward = forward
        n = int(np.prod(fftw.input_shape[-3:] if forward else fftw.output_shape[-3:]))
        self.scale = np.float32(1.0 / np.sqrt(n))

    def execute(self, x: np.ndarray, out: np.ndarray) -> None:
        """Orthonormal transform of ``x`` into ``out``.

        Forward: ``x`` must already match the plan's strides and alignment; FFTW
        reads it in place (r2c transforms preserve their input). Backward: ``x`` is
        copied, scaled on the way, into the private input buffer, because
        multi-dimensional c2r transforms destroy their input.
        """
        try:
            if self.forward:
                self.fftw.update_arrays(x, out)
            else:
                np.multiply(x, self.scale, out=self.src)
                self.fftw.update_arrays(self.src, out)
            self.fftw.execute()
        finally:
            self.fftw.update_arrays(self.src, self.dst)
        if self.forward:
            out *= self.scale


@contextlib.contextmanager
def _plan(direction: str, real_shape: tuple, threads: int):
    """Lend a cached pyFFTW plan for a real-side shape, made on first use in this
    process. Threads that transform the same shape at once each get a plan of their
    own: sharing one serialised them (back-rotations of the statistics, two cores)."""
    key = (direction, tuple(real_shape), threads)
    with _PLAN_LOCK:
        idle = _PLANS.setdefault(key, [])
        # The FFTW planner is not thread-safe: plans are made under the lock too.
        plan = idle.pop() if idle else _new_plan(direction, real_shape, threads)
    try:
        yield plan
    finally:
        with _PLAN_LOCK:
            idle.append(plan)


def _new_plan(direction: str, real_shape: tuple, threads: int) -> _Plan:
    import pyfftw

    complex_shape = tuple(real_shape[:-1]) + (real_shape[-1] // 2 + 1,)
    real = pyfftw.empty_aligned(real_shape, dtype=np.float32)
    cplx = pyfftw.empty_aligned(complex_shape, dtype=np.complex64)
    if direction == "forward":
        src, dst, fftw_dir = real, cplx, "FFTW_FORWARD"
    else:
        src, dst, fftw_dir = cplx, real, "FFTW_BACKWARD"
    fftw = pyfftw.FFTW(
        src,
        dst,
        axes=(-3, -2, -1),
        direction=fftw_dir,
        flags=("FFTW_ESTIMATE",),
        threads=threads,
        ortho=False,
        normalise_idft=False,
    )
    return _Plan(fftw, src, dst, direction == "forward")

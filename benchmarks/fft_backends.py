"""Time batched 3D real FFTs: numpy.fft, scipy.fft and pyFFTW (through mlsubtomo.fft).

Usage::

    python benchmarks/fft_backends.py [--repeats N] [--batch B] [--sizes 32 64]

For every box size, a batch of ``B`` random float32 volumes is transformed forward
(``rfftn``) and back (``irfftn``) over its last three axes with orthonormal
normalisation. Every method is warmed up first (pyFFTW plans are built then), and the
methods are timed in turn within each repeat, so they share the machine's state; the
best repeat is kept and divided by ``B`` to give microseconds per volume.

The table is printed and written to ``benchmarks/results/fft_backends.{json,md}``.
The script exits with status 1 if pyFFTW with one thread is not faster than
numpy.fft in both directions for every size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyfftw
import scipy
import scipy.fft

from mlsubtomo.fft import FFTBackend
from mlsubtomo.io import atomic_write

AXES = (-3, -2, -1)
RESULTS = Path(__file__).resolve().parent / "results"


def _methods(d: int, batch: int):
    """(label, forward(x), inverse(X)) for each method at box size d."""
    shape = (d, d, d)
    methods = [
        (
            "numpy.fft",
            lambda x: np.fft.rfftn(x, axes=AXES, norm="ortho"),
            lambda X: np.fft.irfftn(X, s=shape, axes=AXES, norm="ortho"),
        )
    ]
    for workers in (1, 2):
        methods.append(
            (
                f"scipy.fft workers={workers}",
                lambda x, w=workers: scipy.fft.rfftn(x, axes=AXES, norm="ortho", workers=w),
                lambda X, w=workers: scipy.fft.irfftn(
                    X, s=shape, axes=AXES, norm="ortho", workers=w
                ),
            )
        )
    for threads in (1, 2):
        backend = FFTBackend("pyfftw", threads=threads)
        methods.append(
            (
                f"pyfftw threads={threads}",
                backend.rfftn,
                lambda X, b=backend: b.irfftn(X, d),
            )
        )
    # The same with preallocated outputs (out=), as an inner loop would use them.
    real_out = pyfftw.empty_aligned((batch, d, d, d), np.float32)
    cplx_out = pyfftw.empty_aligned((batch, d, d, d // 2 + 1), np.complex64)
    for threads in (1, 2):
        backend = FFTBackend("pyfftw", threads=threads)
        methods.append(
            (
                f"pyfftw threads={threads} out=",
                lambda x, b=backend: b.rfftn(x, out=cplx_out),
                lambda X, b=backend: b.irfftn(X, d, out=real_out),
            )
        )
    return methods


def _time(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def benchmark(sizes, batch: int, repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for d in sizes:
        x = rng.standard_normal((batch, d, d, d)).astype(np.float32)
        X = np.fft.rfftn(x, axes=AXES, norm="ortho").astype(np.complex64)
        methods = _methods(d, batch)
        for _, fwd, inv in methods:  # warm-up: plans, caches, page faults
            fwd(x)
            inv(X)
        best = {label: [np.inf, np.inf] for label, _, _ in methods}
        for _ in range(repeats):
            for label, fwd, inv in methods:
                best[label][0] = min(best[label][0], _time(fwd, x))
                best[label][1] = min(best[label][1], _time(inv, X))
        for label, _, _ in methods:
            rows.append(
                {
                    "size": d,
                    "method": label,
                    "rfftn_us": 1e6 * best[label][0] / batch,
                    "irfftn_us": 1e6 * best[label][1] / batch,
                }
            )
    return rows


def ratios(rows) -> list[dict]:
    """numpy.fft time over pyFFTW (1 thread) time, per size and direction."""
    out = []
    for d in sorted({r["size"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size"] == d}
        ref, fftw = by["numpy.fft"], by["pyfftw threads=1"]
        out.append(
            {
                "size": d,
                "rfftn": ref["rfftn_us"] / fftw["rfftn_us"],
                "irfftn": ref["irfftn_us"] / fftw["irfftn_us"],
            }
        )
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pyfftw": pyfftw.__version__,
    }


def markdown(rows, ratio_rows, info, batch: int, repeats: int) -> str:
    lines = [
        "# FFT backends: microseconds per volume",
        "",
        f"Batch of {batch} float32 volumes per call, orthonormal, best of {repeats} "
        "repeats after a warm-up; `out=`: outputs preallocated once and reused.",
        "",
        "| size | method | rfftn (us) | irfftn (us) |",
        "|---:|:---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}^3 | {r['method']} | {r['rfftn_us']:.1f} | {r['irfftn_us']:.1f} |"
        )
    lines += [
        "",
        "| size | numpy/pyfftw rfftn | numpy/pyfftw irfftn |",
        "|---:|---:|---:|",
    ]
    for r in ratio_rows:
        lines.append(f"| {r['size']}^3 | {r['rfftn']:.2f} | {r['irfftn']:.2f} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (best kept)")
    parser.add_argument("--batch", type=int, default=32, help="volumes per call")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="box sizes")
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="folder for fft_backends.{json,md}"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be >= 1")

    rows = benchmark(args.sizes, args.batch, args.repeats)
    ratio_rows = ratios(rows)
    info = machine()
    md = markdown(rows, ratio_rows, info, args.batch, args.repeats)

    args.output.mkdir(parents=True, exist_ok=True)
    record = {
        "batch": args.batch,
        "repeats": args.repeats,
        "unit": "microseconds per volume",
        "machine": info,
        "results": rows,
        "numpy_over_pyfftw": ratio_rows,
    }
    atomic_write(args.output / "fft_backends.json", json.dumps(record, indent=2) + "\n")
    atomic_write(args.output / "fft_backends.md", md)
    print(md)

    slower = [
        f"{r['size']}^3 {direction} (ratio {r[direction]:.2f})"
        for r in ratio_rows
        for direction in ("rfftn", "irfftn")
        if not r[direction] > 1.0
    ]
    if slower:
        print(
            "error: pyFFTW (1 thread) is not faster than numpy.fft for " + ", ".join(slower),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

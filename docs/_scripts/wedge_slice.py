"""Central xz slice of two MissingWedge masks, for the conventions page.

Run by the plot directive at build time, so the picture always shows what the
installed mlsubtomo computes rather than a drawing of what it should compute.
"""

import matplotlib.pyplot as plt
import numpy as np

from mlsubtomo import MissingWedge

BOX = 64


def central_xz_slice(mask, box_size):
    """Observed components of the plane qy = 0 as (qz, qx) arrays, centred.

    The half grid stores qx >= 0 only; the other half of the plane follows from
    Hermitian symmetry, w(q) = w(-q).
    """
    half = mask.observed(box_size)[:, 0, :]  # [kz, kx], kx = 0 .. D//2
    freq = np.fft.fftfreq(box_size, 1.0 / box_size).astype(int)
    plane = np.empty((box_size, box_size), dtype=bool)
    for j, qx in enumerate(freq):
        if qx >= 0:
            plane[:, j] = half[:, qx]
        else:
            plane[:, j] = half[(-np.arange(box_size)) % box_size, -qx]
    return np.fft.fftshift(freq), np.fft.fftshift(plane)


def draw(ax, mask, box_size):
    freq, plane = central_xz_slice(mask, box_size)
    lo, hi = freq[0] - 0.5, freq[-1] + 0.5
    ax.imshow(plane, origin="lower", extent=(lo, hi, lo, hi), cmap="Greys_r", vmin=-0.4)
    radius = box_size / 2
    # The section imaged at tilt t contains the direction (cos t, -sin t) of the
    # (qx, qz) plane: the observed region's edges are the sections of the two limits.
    for tilt, colour in ((mask.tilt_min, "C0"), (mask.tilt_max, "C3")):
        t = np.radians(tilt)
        ux, uz = np.cos(t), -np.sin(t)
        ax.plot([-radius * ux, radius * ux], [-radius * uz, radius * uz], color=colour, lw=1.5)
        ax.annotate(f"tilt {tilt:+g}°", (0.6 * radius * ux, 0.6 * radius * uz), color=colour,
                    ha="center", va="center", fontsize=9,
                    bbox={"boxstyle": "round", "fc": "white", "ec": colour})
    ax.set_title(f"MissingWedge({mask.tilt_min:g}, {mask.tilt_max:g})", fontsize=10)
    ax.set_xlabel("$q_x$ (Fourier pixels)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")


fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.4), layout="constrained")
for ax, mask in zip(axes, (MissingWedge(-60, 60), MissingWedge(-50, 65)), strict=True):
    draw(ax, mask, BOX)
axes[0].set_ylabel("$q_z$ (Fourier pixels)")
fig.suptitle(
    f"Central $q_y = 0$ slice, box {BOX}: observed (light), missing or beyond Nyquist (dark)",
    fontsize=10,
)

"""Shared test data: the two GroEL-like phantoms in a small box."""

import pytest

from mlsubtomo.simulate import groel_groes_phantom, groel_phantom

BOX = 16
VOXEL = 240 / BOX  # Angstrom per voxel: the 150 A particle fills about 60% of the box


@pytest.fixture(scope="session")
def phantoms():
    """GroEL-like (D7) and GroEL-GroES-like (C7) maps, box 16, resolution 2.5 voxels."""
    return [
        groel_phantom(BOX, VOXEL, 2.5 * VOXEL),
        groel_groes_phantom(BOX, VOXEL, 2.5 * VOXEL),
    ]

"""mlsubtomo: maximum-likelihood alignment and classification of maps with missing Fourier data."""

__version__ = "0.1.0.dev0"

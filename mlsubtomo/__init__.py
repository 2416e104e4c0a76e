"""mlsubtomo: maximum-likelihood alignment and classification of maps with missing Fourier data.

The estimators follow scikit-learn's API; see ``MissingDataMLClassifier`` (the
method of Scheres et al., Structure 2009) and ``ConstrainedCCClassifier`` (the
constrained cross-correlation baseline).
"""

from .baselines import ConstrainedCCClassifier
from .estimator import ClassCollapseWarning, MissingDataMLClassifier
from .masks import ArrayMask, FullData, MissingCone, MissingPyramid, MissingWedge
from .preprocessing import ParticleNormalizer
from .regularization import Constant, LinearDecay

__version__ = "0.1.0.dev0"

__all__ = [
    "ArrayMask",
    "ClassCollapseWarning",
    "Constant",
    "ConstrainedCCClassifier",
    "FullData",
    "LinearDecay",
    "MissingCone",
    "MissingDataMLClassifier",
    "MissingPyramid",
    "MissingWedge",
    "ParticleNormalizer",
]

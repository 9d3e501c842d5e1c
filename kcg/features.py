"""Feature maps phi computed by a transformer's lower layers, as pure functions of explicit parameters."""

from kcg._src.features import FEATURE_MAPS
from kcg._src.features import FeatureMap
from kcg._src.features import get
from kcg._src.features import identity
from kcg._src.features import IdentityParams
from kcg._src.features import polynomial2
from kcg._src.features import Polynomial2Params
from kcg._src.features import random_fourier
from kcg._src.features import random_relu
from kcg._src.features import RandomFeatureParams

__all__ = (
    "FEATURE_MAPS",
    "FeatureMap",
    "IdentityParams",
    "Polynomial2Params",
    "RandomFeatureParams",
    "get",
    "identity",
    "polynomial2",
    "random_fourier",
    "random_relu",
)

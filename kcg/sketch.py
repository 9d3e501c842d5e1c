"""Width below the feature dimension: KRR on a rank-m sketch psi = S phi, and its error bound."""

from kcg._src.sketch import SketchBound
from kcg._src.sketch import gaussian_projection
from kcg._src.sketch import kernel_distance
from kcg._src.sketch import principal_projection
from kcg._src.sketch import prompt_projection
from kcg._src.sketch import sketch_error_bound
from kcg._src.sketch import sketched_krr_predict
from kcg._src.sketch import spectral_tail

__all__ = (
    "SketchBound",
    "gaussian_projection",
    "kernel_distance",
    "principal_projection",
    "prompt_projection",
    "sketch_error_bound",
    "sketched_krr_predict",
    "spectral_tail",
)

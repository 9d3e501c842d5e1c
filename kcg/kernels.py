"""Kernels on features, `(phi_a [..., n, p], phi_b [..., m, p]) -> [..., n, m]`, for every solver."""

from kcg._src.kernels import ExponentialKernel
from kcg._src.kernels import Kernel
from kcg._src.kernels import exponential_kernel
from kcg._src.kernels import linear_kernel

__all__ = (
    "ExponentialKernel",
    "Kernel",
    "exponential_kernel",
    "linear_kernel",
)

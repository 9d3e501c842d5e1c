"""Random KRR problems with an exact condition number, and the test-case table all layers share."""

from kcg._src.problems import KRRCase
from kcg._src.problems import KRRProblem
from kcg._src.problems import TEST_CASES
from kcg._src.problems import batched_krr_problem
from kcg._src.problems import krr_problem

__all__ = (
    "KRRCase",
    "KRRProblem",
    "TEST_CASES",
    "batched_krr_problem",
    "krr_problem",
)

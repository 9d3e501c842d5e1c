"""Evaluating in-context predictors: errors, agreement with baselines, and which algorithm they match."""

from kcg._src.evaluation import best_matching_step
from kcg._src.evaluation import cosine_similarity
from kcg._src.evaluation import error_cosine
from kcg._src.evaluation import error_vs_num_support
from kcg._src.evaluation import evaluate
from kcg._src.evaluation import fit_gd_preconditioner
from kcg._src.evaluation import fit_gd_step
from kcg._src.evaluation import GDStepFit
from kcg._src.evaluation import implicit_weights
from kcg._src.evaluation import mse
from kcg._src.evaluation import normalized_mse
from kcg._src.evaluation import per_problem_r2
from kcg._src.evaluation import prediction_similarity
from kcg._src.evaluation import R2Interval
from kcg._src.evaluation import r2_with_ci
from kcg._src.evaluation import sensitivity_cosine
from kcg._src.evaluation import Similarity
from kcg._src.evaluation import StepMatch
from kcg._src.evaluation import SupportCurve
from kcg._src.evaluation import task_sampler

__all__ = (
    "GDStepFit",
    "R2Interval",
    "Similarity",
    "StepMatch",
    "SupportCurve",
    "best_matching_step",
    "cosine_similarity",
    "error_cosine",
    "error_vs_num_support",
    "evaluate",
    "fit_gd_preconditioner",
    "fit_gd_step",
    "implicit_weights",
    "mse",
    "normalized_mse",
    "per_problem_r2",
    "prediction_similarity",
    "r2_with_ci",
    "sensitivity_cosine",
    "task_sampler",
)

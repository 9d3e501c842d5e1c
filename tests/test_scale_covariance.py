"""Property: a compiled model answers rescaled prompts as KRR does, over many decades of scale.

KRR is scale covariant: x -> c x, ridge -> c^2 ridge, y -> s y gives f -> s f (the kernel matrix
scales by c^2 and so does the ridge; softmax Route A's kernel exp(<x, x'>/tau) needs tau -> c^2 tau
instead and keeps its ridge). The divided quantities r.r and p.Ap scale by s^2 and c^2 s^2, so
these prompts walk them across the reciprocal's range: the grid reaches r.r ~ 1e-40 (c = 1e-2,
s = 1e-14) and p.Ap ~ 1e14 (c = 1e2, s = 1e4), inside the float64 range [1e-40, 1e20] of
kcg._src.reciprocal. Narrowing that range at either end (to 1e-30, or to 1e8) makes these
predictions 5% to 100% wrong or NaN; this test fails then.

Tolerance: the converged prediction against s times the Cholesky KRR of the unscaled prompt, at
100 eps kappa s_f (s_f: the unscaled prediction's scale, as in test_matches_reference.py; scaling by
powers of ten is not exact, so each scale rounds differently). Measured <= 0.12 eps kappa for CG,
<= 36 eps kappa for PCG at y * 1e-14, where r.z starts near 1e-32 and its reciprocal works at the
bottom of its range.
"""

import numpy as np
import pytest

import construction_table as table

K, D, Q = 6, 3, 2
RIDGE = 0.3
SCALES_X = (1e-2, 1e2)
SCALES_Y = (1e-14, 1e-7, 1.0, 1e4)
FAST = ("cg/dual/prefix", "cg/dual/causal", "cg/primal/causal", "pcg/jacobi")
# Route B approximates its kernel; the random-ReLU layer's bias breaks the covariance; Chebyshev
# divides by nothing (its step sizes are weights, scaled with the bounds).
EXCLUDED = ("softmax/route_b", "random_relu/prefix", "random_relu/causal", "random_relu/primal",
            "chebyshev/prefix", "chebyshev/causal", "chebyshev/primal")
SLOW = [n for n in table.ENTRIES if n not in FAST + EXCLUDED]


def _steps(entry):
  if entry.solver == "chebyshev":
    return 60
  if entry.solver == "block":
    return 3 * -(-K // entry.num_outputs) + 2
  return 3 * (D if entry.form == "primal" else K)


def check(name):
  entry = table.ENTRIES[name]
  xs, ys, xq = table.prompts(entry, K, D, Q, seed=4)
  phi, phi_q = table.features(entry, xs[0]), table.features(entry, xq[0])
  ref = table.reference(entry, phi, ys[0], phi_q, RIDGE, 1, table.eig_bounds(entry, phi, RIDGE),
                        draws=0)
  worst = 0.0
  for c in SCALES_X:
    if entry.kernel == "exponential":
      compiled = table.compiled(entry, K, D, _steps(entry), RIDGE,
                                temperature=c * c * table.TEMPERATURE)
    else:
      compiled = table.compiled(entry, K, D, _steps(entry), c * c * RIDGE)
    for s in SCALES_Y:
      got = np.asarray(compiled.predict(c * xs, s * ys, c * xq))[0]
      error = np.abs(got - s * ref.f_star).max() / (s * ref.scale)
      worst = max(worst, error)
      assert error <= 100 * table.EPS * ref.kappa, (c, s, error)
  return worst


@pytest.mark.parametrize("name", FAST)
def test_rescaled_prompts_give_rescaled_predictions(name):
  check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_rescaled_prompts_give_rescaled_predictions_all(name):
  check(name)

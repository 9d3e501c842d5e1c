"""The table of compiled constructions that the property tests run, one test file per property.

lineax keeps one table of solvers (its tests/helpers.py) and runs every property on each; this is
kcg's. An `Entry` says how to compile a construction, which features its kernel reads (computed
here, independently of the model), which system it solves and which references it must match:

* `system`: the SPD system A a = b the construction iterates on and the read-out of its
  predictions (dual: A = K + ridge I, b = y, f = K(x, supports) a; primal: A = Phi^T Phi + ridge I,
  b = Phi^T y, f = phi(x) . w), built in NumPy from the features.
* `iterates`: the construction's algorithm from kcg.solvers (CG, Jacobi PCG, Chebyshev, block CG)
  on that system; `third_party_iterates`: an independent implementation (scipy.sparse.linalg.cg
  with a per-step callback; a NumPy O'Leary block CG), None for Chebyshev, whose recurrence has
  no ratios of shrinking quantities and is not chaotic.

Properties: tests/test_matches_reference.py, test_structure.py, test_no_leakage.py,
test_bad_input.py (rescaled prompts: test_dynamic_range.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

import kcg
from kcg import solvers

EPS = np.finfo(np.float64).eps
TEMPERATURE = 2.0
ROUTE_B_TEMPERATURE = 300.0


class Entry(NamedTuple):
  """One compiled construction.

  Attributes:
    name: test id.
    options: keyword options of kcg.compile_cg (kcg.compile_chebyshev when solver="chebyshev").
    solver: the algorithm: "cg", "pcg", "chebyshev" or "block".
    form: "dual" or "primal" (which system, see the module docstring).
    kernel: "linear" or "exponential" (softmax Route A, temperature TEMPERATURE).
    features: "identity", "random_relu" (a compiled first layer) or "projection" (S [m, d],
      m < d: sketched KRR on S x).
    num_outputs: r.
    exact: False for softmax Route B, which approximates the linear kernel's CG.
    dimensions: whether kcg.dimensions describes it (linear attention, identity features).
  """

  name: str
  options: dict
  solver: str = "cg"
  form: str = "dual"
  kernel: str = "linear"
  features: str = "identity"
  num_outputs: int = 1
  exact: bool = True
  dimensions: bool = True

  @property
  def mask(self) -> str:
    return self.options.get("mask", "causal")

  @property
  def attention(self) -> str:
    return self.options.get("attention", "linear")


def _softmax(**options):
  return dict(mask="prefix", attention="softmax", temperature=TEMPERATURE, **options)


ENTRIES = {e.name: e for e in (
    Entry("cg/dual/prefix", dict(mask="prefix")),
    Entry("cg/dual/causal", dict(mask="causal")),
    Entry("cg/primal/causal", dict(form="primal"), form="primal"),
    Entry("cg/primal/prefix", dict(form="primal", mask="prefix"), form="primal"),
    Entry("carried/dual/prefix", dict(mask="prefix", carry_matvec=True)),
    Entry("carried/dual/causal", dict(mask="causal", carry_matvec=True)),
    Entry("carried/primal/six_layers", dict(form="primal", carry_matvec=True, newton_steps=2),
          form="primal"),
    Entry("pcg/jacobi", dict(mask="prefix", preconditioner="jacobi"), solver="pcg"),
    Entry("softmax/route_a", _softmax(), kernel="exponential", dimensions=False),
    Entry("softmax/route_a/projected", _softmax(), kernel="exponential", features="projection",
          dimensions=False),
    Entry("softmax/route_b", dict(mask="prefix", attention="softmax", kernel="linear",
                                  temperature=ROUTE_B_TEMPERATURE, temperature_heads=2),
          exact=False, dimensions=False),
    Entry("outputs/dual/prefix", dict(mask="prefix", num_outputs=2), num_outputs=2),
    Entry("outputs/dual/causal", dict(mask="causal", num_outputs=2), num_outputs=2),
    Entry("outputs/primal", dict(form="primal", num_outputs=2), form="primal", num_outputs=2),
    Entry("outputs/pcg", dict(mask="prefix", preconditioner="jacobi", num_outputs=2),
          solver="pcg", num_outputs=2),
    Entry("block/r2", dict(mask="prefix", num_outputs=2, multi_output="block"), solver="block",
          num_outputs=2),
    Entry("block/r3", dict(mask="prefix", num_outputs=3, multi_output="block"), solver="block",
          num_outputs=3),
    Entry("chebyshev/prefix", dict(mask="prefix"), solver="chebyshev", dimensions=False),
    Entry("chebyshev/causal", dict(mask="causal"), solver="chebyshev", dimensions=False),
    Entry("chebyshev/primal", dict(form="primal"), solver="chebyshev", form="primal",
          dimensions=False),
    Entry("prenorm/prefix", dict(mask="prefix", norm="rmsnorm")),
    Entry("prenorm/causal", dict(mask="causal", norm="rmsnorm")),
    Entry("prenorm/pcg", dict(mask="prefix", preconditioner="jacobi", norm="rmsnorm"),
          solver="pcg"),
    Entry("random_relu/prefix", dict(mask="prefix"), features="random_relu", dimensions=False),
    Entry("random_relu/causal", dict(mask="causal"), features="random_relu", dimensions=False),
    Entry("random_relu/primal", dict(form="primal"), form="primal", features="random_relu",
          dimensions=False),
    Entry("sketch/prefix", dict(mask="prefix"), features="projection", dimensions=False),
    Entry("sketch/primal", dict(form="primal"), form="primal", features="projection",
          dimensions=False),
)}


# ---------------------------------------------------------------------------------------------
# Features: computed here from the inputs x, not by the compiled model.


def feature_dim(entry: Entry, input_dim: int) -> int:
  """The size of the features the kernel reads for inputs of size d."""
  if entry.features == "random_relu":
    return 2 * input_dim
  if entry.features == "projection":
    return max(1, input_dim - 1)
  return input_dim


def _relu_map(input_dim: int):
  feature_map = kcg.features.random_relu(feature_dim(ENTRIES["random_relu/causal"], input_dim),
                                         bias_scale=0.5)
  return feature_map, feature_map.init(jax.random.key(input_dim), input_dim)


@functools.lru_cache(maxsize=None)
def projection(input_dim: int) -> np.ndarray:
  """S [m, d] with orthonormal rows, m = d - 1 (d = 1: S = [[1]])."""
  m = max(1, input_dim - 1)
  q, _ = np.linalg.qr(np.random.default_rng(input_dim).normal(size=(input_dim, input_dim)))
  return np.ascontiguousarray(q[:, :m].T)


def features(entry: Entry, x: np.ndarray) -> np.ndarray:
  """phi(x) [..., m]: what the construction's kernel reads (softmax: U stays inside the kernel)."""
  x = np.asarray(x, np.float64)
  if entry.features == "random_relu":
    feature_map, params = _relu_map(x.shape[-1])
    return np.asarray(feature_map.apply(params, x))
  if entry.features == "projection" and entry.kernel == "linear":
    return x @ projection(x.shape[-1]).T
  return x


def kernel_matrix(entry: Entry, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  if entry.kernel == "exponential":
    u = projection(a.shape[-1]) if entry.features == "projection" else np.eye(a.shape[-1])
    return np.exp((a @ u.T) @ (b @ u.T).T / TEMPERATURE)
  return a @ b.T


# ---------------------------------------------------------------------------------------------
# Compiling.


def eig_bounds(entry: Entry, phi: np.ndarray, ridge: float) -> tuple[float, float] | None:
  """Chebyshev's spectral bounds: the extreme eigenvalues of the system (None for the others)."""
  if entry.solver != "chebyshev":
    return None
  eigenvalues = np.linalg.eigvalsh(system(entry, phi, np.zeros(phi.shape[0]), phi[:1], ridge)[0])
  return float(eigenvalues[0]), float(eigenvalues[-1])


@functools.lru_cache(maxsize=None)
def _compile(name: str, num_support: int, input_dim: int, num_steps: int, ridge: float,
             bounds: tuple[float, float] | None, temperature: float | None, dtype):
  entry = ENTRIES[name]
  options = dict(entry.options)
  if temperature is not None:
    options["temperature"] = temperature
  p = input_dim
  if entry.features == "random_relu":
    feature_map, params = _relu_map(input_dim)
    options.update(features="random_relu", feature_params=params)
    p = feature_dim(entry, input_dim)
  elif entry.features == "projection":
    options["projection"] = projection(input_dim)
  if entry.solver == "chebyshev":
    return kcg.compile_chebyshev(num_support, p, num_steps, ridge, eig_bounds=bounds, dtype=dtype,
                                 **options)
  return kcg.compile_cg(num_support, p, num_steps, ridge, dtype=dtype, **options)


def compiled(entry: Entry, num_support: int, input_dim: int, num_steps: int, ridge: float, *,
             bounds: tuple[float, float] | None = None, temperature: float | None = None,
             dtype=None) -> kcg.CompiledCG:
  """The compiled model (cached: the property files share compiles). Chebyshev needs `bounds`;
  default (ridge, ridge + 30) for the tests that do not read its numbers. `temperature` replaces
  the softmax routes' own."""
  if entry.solver == "chebyshev" and bounds is None:
    bounds = (ridge, ridge + 30.0)
  return _compile(entry.name, num_support, input_dim, num_steps, float(ridge), bounds, temperature,
                  dtype)


def prompts(entry: Entry, num_support: int, input_dim: int, num_query: int, seed: int,
            batch: int = 1, scale: float = 1.0):
  """Random prompts (x_support [B,k,d], y_support [B,k] or [B,k,r], x_query [B,q,d])."""
  rng = np.random.default_rng(seed)
  y_shape = (batch, num_support) + ((entry.num_outputs,) if entry.num_outputs > 1 else ())
  return (scale * rng.normal(size=(batch, num_support, input_dim)), rng.normal(size=y_shape),
          scale * rng.normal(size=(batch, num_query, input_dim)))


def with_outputs(entry: Entry, y: np.ndarray, seed: int) -> np.ndarray:
  """y [k] for one output, [k, r] for r: y and r - 1 more random columns of its size."""
  if entry.num_outputs == 1:
    return y
  extra = np.random.default_rng(seed).normal(size=y.shape + (entry.num_outputs - 1,))
  return np.concatenate([y[:, None], extra * max(np.abs(y).max(), 1.0)], axis=-1)


# ---------------------------------------------------------------------------------------------
# References.


def system(entry: Entry, phi, y, phi_query, ridge):
  """(A [n, n], b [n] or [n, r], readout [q, n]) with predictions f = readout a."""
  if entry.form == "primal":
    return phi.T @ phi + ridge * np.eye(phi.shape[1]), phi.T @ y, phi_query
  return (kernel_matrix(entry, phi, phi) + ridge * np.eye(phi.shape[0]), y,
          kernel_matrix(entry, phi_query, phi))


def _columns(b):
  return [b] if b.ndim == 1 else [b[:, c] for c in range(b.shape[1])]


def _stack_columns(columns, b):
  return columns[0] if b.ndim == 1 else np.stack(columns, axis=-1)


def iterates(entry: Entry, a, b, num_steps: int, bounds=None, ridge: float | None = None):
  """a_t, t = 0..num_steps, of the construction's algorithm (kcg.solvers): [t+1, n] ([.., r])."""
  if entry.solver == "block":
    return np.asarray(solvers.block_cg(a - ridge * np.eye(a.shape[0]), b, ridge, num_steps).alpha)
  out = []
  for column in _columns(b):
    if entry.solver == "pcg":
      trace = solvers.pcg(a, column, num_steps, solvers.jacobi_diagonal(a))
    elif entry.solver == "chebyshev":
      trace = solvers.chebyshev(a, column, num_steps, bounds)
    else:
      trace = solvers.cg(a, column, num_steps)
    out.append(np.asarray(trace.alpha))
  return _stack_columns(out, b)


def _scipy_cg(a, b, num_steps, preconditioner=None):
  trace = [np.zeros_like(b)]

  def record(x):  # a residual of exactly 0 makes scipy's next step 0/0: keep the solution
    trace.append(np.array(x) if np.all(np.isfinite(x)) else trace[-1])

  # rtol = atol = 0: exactly num_steps steps; the callback sees the iterate after each step.
  with np.errstate(invalid="ignore", divide="ignore"):
    scipy.sparse.linalg.cg(a, b, x0=np.zeros_like(b), rtol=0.0, atol=0.0, maxiter=num_steps,
                           M=preconditioner, callback=record)
  return np.stack(trace + [trace[-1]] * (num_steps + 1 - len(trace)))


def _oleary(a, y, num_steps):
  """Textbook block CG (O'Leary 1980, two r x r solves per step), NumPy."""
  x, r, p = np.zeros_like(y), y.copy(), y.copy()
  xs = [x]
  for _ in range(num_steps):
    ap = a @ p
    rr = r.T @ r
    x = x + p @ np.linalg.solve(p.T @ ap, rr)
    r_next = r - ap @ np.linalg.solve(p.T @ ap, rr)
    p = r_next + p @ np.linalg.solve(rr, r_next.T @ r_next)
    r = r_next
    xs.append(x)
  return np.stack(xs)


def third_party_iterates(entry: Entry, a, b, num_steps: int):
  """The same algorithm implemented independently (scipy, NumPy), or None (Chebyshev)."""
  if entry.solver == "chebyshev":
    return None
  if entry.solver == "block":
    return _oleary(a, b, num_steps)
  preconditioner = np.diag(1 / np.diag(a)) if entry.solver == "pcg" else None
  return _stack_columns([_scipy_cg(a, column, num_steps, preconditioner)
                         for column in _columns(b)], b)


def predictions(readout, a_t):
  """f_t = readout a_t: [t+1, q] ([t+1, q, r])."""
  return np.einsum("qn,tn...->tq...", readout, a_t)


class Reference(NamedTuple):
  """What a compiled run is checked against (see tests/test_matches_reference.py).

  f: kcg.solvers' predictions [t+1, q(, r)]; f_third_party: the independent implementation's (or
  None); spread [t+1]: how far kcg.solvers' trajectory moves under eps-sized relative perturbations
  of phi and y (max over 4 draws, per step); a: the system; solution: A^{-1} b by Cholesky
  (scipy); f_star: the KRR prediction; kappa: cond(A); scale: max_q ||readout_q|| ||A^{-1} b||,
  which bounds |f_t| (CG iterates grow in norm towards the solution).
  """

  f: np.ndarray
  f_third_party: np.ndarray | None
  spread: np.ndarray
  a: np.ndarray
  solution: np.ndarray
  f_star: np.ndarray
  kappa: float
  scale: float


def reference(entry: Entry, phi, y, phi_query, ridge: float, num_steps: int, bounds=None,
              draws: int = 4) -> Reference:
  a, b, readout = system(entry, phi, y, phi_query, ridge)
  f = predictions(readout, iterates(entry, a, b, num_steps, bounds, ridge))
  other = third_party_iterates(entry, a, b, num_steps)
  f_other = None if other is None else predictions(readout, other)
  rng = np.random.default_rng(0)
  spread = np.zeros(num_steps + 1)
  for _ in range(draws):
    moved = system(entry, phi * (1 + EPS * rng.standard_normal(phi.shape)),
                   y * (1 + EPS * rng.standard_normal(y.shape)), phi_query, ridge)
    f_moved = predictions(moved[2], iterates(entry, moved[0], moved[1], num_steps, bounds, ridge))
    spread = np.maximum(spread, np.abs(f_moved - f).reshape(num_steps + 1, -1).max(-1))
  solution = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)
  norms = np.linalg.norm(readout, axis=-1).max() * np.linalg.norm(solution, axis=0).max()
  return Reference(f, f_other, spread, a, solution, readout @ solution, float(np.linalg.cond(a)),
                   float(norms))


def a_norm_error(a, iterates_t, solution) -> np.ndarray:
  """||a_t - a*||_A summed over outputs in quadrature: [t+1]."""
  e = (iterates_t - solution[None]).reshape(iterates_t.shape[0], a.shape[0], -1)
  return np.sqrt(np.maximum(np.einsum("tnr,nm,tmr->t", e, a, e), 0.0))

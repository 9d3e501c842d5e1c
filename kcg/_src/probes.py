"""Linear probes from residual streams to the CG state, with the controls that make them mean something.

A *subject* is a model seen through its residual stream, compiled or trained, behind one interface
(`Subject`): `forward(x_support, y_support, x_query, return_residuals=, head_mask=, layer_mask=)` and the
model's own readout applied to any residual (`readout`, the "logit lens"). Every prompt is encoded as in
`kcg.prompt`: tokens `[support_1..support_k, aggregator, query_1..query_q]`, so a *site* names tokens:
`"support"` (the k support tokens, one target entry each), `"aggregator"` (the one aggregator token) or
`"query"` (the q query tokens).

Probe. For features `h [B, S, D]` (S tokens of the site per prompt) and targets `Y [B, S, M]`, a ridge
regression `Y ~ Z W + b` on standardised features `Z` is fitted on the prompts of k-1 folds and predicts the
held-out fold (k-fold cross-validation over prompts, every prompt predicted once while held out):

    W = (Z^T Z + ridge * n I)^{-1} Z^T (Y - mean Y),   n = rows in the training folds.

Scores on the held-out predictions `P`: `cosine` = mean over prompts of `<P_b, Y_b> / (|P_b| |Y_b|)` (the
`S x M` entries of prompt b as one vector; the proposal's criterion is cosine > 0.9) and `r2` =
`1 - sum (P - Y)^2 / sum (Y - mean Y)^2` pooled over all held-out entries.

Controls. A high cosine can be trivial: a target with a large common mean or only one or two dimensions
has high cosine with a constant. So every probe is repeated (a) with targets shuffled across prompts
(the prompt-specific information is destroyed; what remains is the marginal), and (b) on the residuals of
a randomly initialised model of the same architecture (`random_init_like`; it reads the inputs, so
whatever is a linear function of them, such as `alpha_1 = gamma_0 y`, is recovered there too).
`ProbeResult.trivial` flags a probe whose controls already reach the cosine threshold.

Sample size. The probe has one coefficient per feature column that varies on the training folds; with
fewer training rows than such columns (`ProbeScore.rows_per_feature < 1`) the ridge fit interpolates its
training rows and the held-out cosine drops for lack of data, not of information: the compiled dual/causal
CG (k = 16, d = 8) keeps alpha_4 in 52 varying aggregator columns, and 64 prompts (51 training rows per
fold) give a held-out cosine of 0.995 where 256 give 1 - 1e-12. One token per prompt (the aggregator)
is where this bites; a per-token site has S rows per prompt.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kcg._src import checks
from kcg._src import craft
from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib
from kcg._src import solvers

Array = jax.Array

SITES = ("support", "aggregator", "query")
QUANTITIES = ("alpha", "r", "p", "w")


# ----------------------------------------------------------------------------------------------------
# Subjects: compiled and trained models behind one interface.
# ----------------------------------------------------------------------------------------------------


class Subject(NamedTuple):
  """A model seen through its residual stream.

  Attributes:
    name: a readable name (used in reports).
    config: its `kcg.ModelConfig`.
    forward: `(x_support [B,k,d], y_support [B,k], x_query [B,q,d], *, return_residuals=False,
      head_mask=None, layer_mask=None) -> kcg.ForwardOutput` (residuals `[L+1, B, T, D]`).
    readout: the model's own final norm and readout applied to residuals `[..., D] -> [...]` (output 0):
      applied to an intermediate layer this is the "logit lens".
    layer_names: a name for every layer (`L` entries).
    input_dim: the input dimension the model was built for (smaller inputs are zero-padded).
    positional: whether its prompts carry one-hot support positions.
    program: the compiled `Program` (None for trained models).
    model: the `kcg.Transformer` behind `forward` (None if the subject wraps something else).
  """

  name: str
  config: model_lib.ModelConfig
  forward: Callable[..., model_lib.ForwardOutput]
  readout: Callable[[Array], Array]
  layer_names: tuple[str, ...]
  input_dim: int
  positional: bool = False
  program: Any = None
  model: Any = None

  @property
  def num_layers(self) -> int:
    """L, the subject's number of layers (its residual streams are `L + 1`, with the input)."""
    return self.config.num_layers


def _readout_fn(model: model_lib.Transformer) -> Callable[[Array], Array]:
  """Final norm (if any) and readout column 0 of `model`, as a pure function of residuals [..., D]."""
  c = model.config
  kernel = model.readout.kernel[...][:, 0]
  bias = model.readout.bias[...][0] if c.use_bias else None
  scale = model.final_norm_scale[...] if c.norm is not None else None
  shift = model.final_norm_bias[...] if c.norm == "layernorm" else None

  def readout(h):
    dtype = h.dtype
    cast = lambda a: jnp.asarray(a, dtype)
    flat = h.reshape((1, -1, h.shape[-1]))
    if c.norm is not None:
      flat = model_lib._normalize(flat, cast(scale), None if shift is None else cast(shift), c.norm,
                                  c.norm_eps)  # pylint: disable=protected-access
    out = jnp.einsum("btd,d->bt", flat, cast(kernel), precision=checks.HIGHEST)
    if bias is not None:
      out = out + cast(bias)
    return out.reshape(h.shape[:-1])

  return readout


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "return_residuals"))
def _encode_apply(state, x_support, y_support, x_query, head_mask, layer_mask, *, graphdef, layout,
                  return_residuals):
  """Pads, encodes (`kcg.prompt`) and runs the model in one compiled call."""
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, layout.input_dim - x.shape[-1])))
  tokens = prompt_lib.encode(layout, pad(x_support), y_support, pad(x_query))
  model = nnx.merge(graphdef, state)
  return model(tokens, num_prefix=layout.num_prefix, return_residuals=return_residuals,
               head_mask=head_mask, layer_mask=layer_mask)


def _forward_fn(model: model_lib.Transformer, input_dim: int, positional: bool,
                num_outputs: int = 1) -> Callable:
  graphdef, state = nnx.split(model)
  config = model.config
  targets = "[B, k]" if num_outputs == 1 else f"[B, k, {num_outputs}]"

  def forward(x_support, y_support, x_query, *, return_residuals=False, head_mask=None,
              layer_mask=None):
    dtype = checks.float_dtype(x_support, y_support, x_query)
    x_support, y_support, x_query = (checks.as_array(n, a, dtype) for n, a in (
        ("x_support", x_support), ("y_support", y_support), ("x_query", x_query)))
    y_shape = x_support.shape[:2] + ((num_outputs,) if num_outputs > 1 else ())
    if x_support.ndim != 3 or x_query.ndim != 3 or y_support.shape != y_shape:
      raise ValueError(f"prompts must be x_support [B, k, d], y_support {targets}, x_query [B, q, d]; "
                       f"got {x_support.shape}, {y_support.shape}, {x_query.shape}.")
    for name, x in (("x_support", x_support), ("x_query", x_query)):
      if x.shape[-1] > input_dim:
        raise ValueError(f"{name} has {x.shape[-1]} input dimensions but the model reads input_dim="
                         f"{input_dim}; pass at most {input_dim}.")
    layout = prompt_lib.make_layout(x_support.shape[1], x_query.shape[1], input_dim,
                                    positional=positional, num_outputs=num_outputs)
    if layout.token_dim != config.token_dim:
      raise ValueError(f"the prompt encodes to {layout.token_dim} features per token but the model "
                       f"reads {config.token_dim}; check input_dim and positional (and, for a "
                       "positional encoding, the number of supports).")
    return _encode_apply(state, x_support, y_support, x_query, _mask_or_none(head_mask, dtype),
                         _mask_or_none(layer_mask, dtype), graphdef=graphdef, layout=layout,
                         return_residuals=bool(return_residuals))

  return forward


def subject_from_model(model: model_lib.Transformer, *, input_dim: int, positional: bool = False,
                       name: str = "model", layer_names: Sequence[str] | None = None) -> Subject:
  """A `Subject` for any `kcg.Transformer` reading `kcg.prompt` tokens (inputs zero-padded to input_dim)."""
  if not isinstance(model, model_lib.Transformer):
    raise ValueError(f"model must be a kcg.Transformer, got {type(model).__name__}.")
  input_dim = checks.check_positive_int("input_dim", input_dim)
  config = model.config
  names = tuple(layer_names) if layer_names is not None else tuple(
      f"layer {l}" for l in range(config.num_layers))
  if len(names) != config.num_layers:
    raise ValueError(f"layer_names has {len(names)} entries for {config.num_layers} layers.")
  return Subject(name, config, _forward_fn(model, input_dim, bool(positional)), _readout_fn(model),
                 names, input_dim, bool(positional), None, model)


def _mask_or_none(mask, dtype):
  return None if mask is None else jnp.asarray(mask, dtype)


def subject_from_compiled(compiled: Any, name: str | None = None) -> Subject:
  """A `Subject` for a `kcg.CompiledCG` (its model, its readout, `craft.layer_names`).

  Prompts in the compiled dtype run its model directly; other dtypes go through `compiled.forward`,
  which builds the model for that dtype (the reciprocal's range depends on it).
  """
  if not hasattr(compiled, "program") or not hasattr(compiled, "forward"):
    raise ValueError(f"compiled must be a kcg.CompiledCG, got {type(compiled).__name__}.")
  positional = compiled.prompt_layout.positional
  # With a compiled feature layer (features="random_relu") the prompt holds x, not phi(x).
  input_dim = getattr(compiled, "input_dim", compiled.feature_dim)
  direct = _forward_fn(compiled.model, input_dim, positional, compiled.num_outputs)

  def forward(x_support, y_support, x_query, *, return_residuals=False, head_mask=None,
              layer_mask=None):
    dtype = checks.float_dtype(x_support, y_support, x_query)
    if dtype == compiled.dtype:
      return direct(x_support, y_support, x_query, return_residuals=return_residuals,
                    head_mask=head_mask, layer_mask=layer_mask)
    return compiled.forward(x_support, y_support, x_query, return_residuals=return_residuals,
                            head_mask=_mask_or_none(head_mask, dtype),
                            layer_mask=_mask_or_none(layer_mask, dtype))

  default = f"compiled CG t={compiled.num_steps} ({compiled.form}, {compiled.mask})"
  return Subject(name or default, compiled.config, forward, _readout_fn(compiled.model),
                 craft.layer_names(compiled.program), input_dim, positional, compiled.program,
                 compiled.model)


def subject_from_trained(trained: Any, name: str | None = None) -> Subject:
  """A `Subject` for a `kcg.training.TrainedModel` trained with the "query" encoding."""
  config = getattr(trained, "config", None)
  data = getattr(config, "data", None)
  if data is None or not hasattr(trained, "model"):
    raise ValueError(f"trained must be a kcg.training.TrainedModel, got {type(trained).__name__}.")
  if data.encoding != "query":
    raise ValueError("probes, ablations and layer matching read the 'query' encoding (one token per "
                     "support, the aggregator, the queries); this model was trained with "
                     f"encoding={data.encoding!r}.")
  default = f"trained L={trained.model.config.num_layers} ({trained.model.config.attention})"
  return subject_from_model(trained.model, input_dim=data.input_dim, name=name or default)


@functools.lru_cache(maxsize=16)
def _init_state(config: model_lib.ModelConfig) -> Callable:
  """`key -> nnx.State` of a fresh model, compiled once per architecture (eager initialisation
  dispatches, and compiles, every random draw separately)."""
  return jax.jit(lambda key: nnx.split(model_lib.Transformer(config, rngs=nnx.Rngs(key)))[1])


def random_init_like(subject: Subject, seed: int = 0) -> Subject:
  """The control: a freshly initialised `kcg.Transformer` of the same architecture and encoding."""
  config = subject.config
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  model = nnx.merge(graphdef, _init_state(config)(jax.random.key(int(seed))))
  return subject_from_model(model, input_dim=subject.input_dim, positional=subject.positional,
                            name=f"random init ({subject.name})", layer_names=subject.layer_names)


def predict_fn(subject: Subject) -> Callable[..., Array]:
  """The subject as a predictor `(x_support, y_support, x_query) -> [B, q]` (its query outputs)."""

  def predict(x_support, y_support, x_query):
    out = subject.forward(x_support, y_support, x_query).outputs
    return out[:, -jnp.shape(x_query)[1]:, 0]

  return predict


def residuals(subject: Subject, prompts: Any) -> Array:
  """The residual streams `[L+1, B, T, D]` of `subject` on `prompts` (x_support, y_support, x_query)."""
  return subject.forward(prompts.x_support, prompts.y_support, prompts.x_query,
                         return_residuals=True).residuals


# ----------------------------------------------------------------------------------------------------
# Sites and targets.
# ----------------------------------------------------------------------------------------------------


def _check_site(site: str) -> str:
  if site not in SITES:
    raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}.")
  return site


def site_features(residuals_LxBxTxD: Any, site: str, num_support: int) -> np.ndarray:
  """The residuals of a site's tokens, `[L+1, B, S, D]` (S = k supports, 1 aggregator, or q queries).

  Returned as a NumPy array (probing runs in NumPy, see `cross_validated_probe`).
  """
  site = _check_site(site)
  num_support = checks.check_positive_int("num_support", num_support)
  h = np.asarray(residuals_LxBxTxD)
  if h.ndim != 4 or h.shape[2] < num_support + 1:
    raise ValueError(f"residuals must be [L+1, B, T, D] with T >= num_support + 1 = "
                     f"{num_support + 1} tokens, got shape {h.shape}.")
  if site == "support":
    return h[:, :, :num_support]
  if site == "aggregator":
    return h[:, :, num_support:num_support + 1]
  if h.shape[2] == num_support + 1:
    raise ValueError("site 'query' needs query tokens; these residuals have none.")
  return h[:, :, num_support + 1:]


def site_targets(values: Any, site: str, num_tokens: int | None = None) -> np.ndarray:
  """Targets laid out per site token, `[B, S, M]`.

  * `"support"`: `values [B, k]` (one entry per support token, e.g. `alpha_t` in the per-support
    construction) or `[B, k, M]`;
  * `"aggregator"`: a vector per prompt `[B, n]` -> `[B, 1, n]`;
  * `"query"`: a vector per prompt `[B, n]`, repeated at each of `num_tokens` query tokens, or per-query
    values `[B, q]` / `[B, q, M]`.
  """
  site = _check_site(site)
  values = np.asarray(values)
  if values.ndim < 2:
    raise ValueError(f"targets must have a batch axis and at least one more, got shape {values.shape}.")
  if site == "support":
    return values[..., None] if values.ndim == 2 else values
  if site == "aggregator":
    if values.ndim != 2:
      raise ValueError(f"aggregator targets are one vector per prompt, [B, n]; got {values.shape}.")
    return values[:, None, :]
  if values.ndim == 3:
    return values
  if num_tokens is None:
    raise ValueError("query targets [B, n] are repeated at every query token: pass num_tokens = q.")
  return np.broadcast_to(values[:, None, :], (values.shape[0], num_tokens, values.shape[1]))


class StateTargets(NamedTuple):
  """The CG state after every step, for probing: each `[B, T+1, n]`.

  alpha, r, p: CG on `(K + ridge I) alpha = y` (n = k; form="dual") or on
  `(Phi^T Phi + ridge I) w = Phi^T y` (n = p; form="primal", then alpha holds w); w: the primal weights
  `Phi^T alpha_t` (dual) or the iterate itself (primal), `[B, T+1, p]`.
  """

  alpha: Array
  r: Array
  p: Array
  w: Array


def state_targets(x_support: Any, y_support: Any, ridge: Any, num_steps: int, *, form: str = "dual",
                  feature_map: Callable | None = None) -> StateTargets:
  """Reference CG state (kcg.solvers) on `phi(x_support)` (identity if no feature map), every step."""
  if form not in ("dual", "primal"):
    raise ValueError(f"unknown form {form!r}; choose 'dual' or 'primal'.")
  num_steps = checks.check_num_steps(num_steps)
  checks.check_ridge(ridge)
  dtype = checks.float_dtype(x_support, y_support)
  x_support = checks.as_array("x_support", x_support, dtype, min_ndim=3, shape_doc="[B, k, d]")
  y_support = checks.as_array("y_support", y_support, dtype, min_ndim=2, shape_doc="[B, k]")
  if y_support.shape != x_support.shape[:-1]:
    raise ValueError(f"y_support must have shape {x_support.shape[:-1]}, got {y_support.shape}.")
  phi = x_support if feature_map is None else jnp.asarray(feature_map(x_support), dtype)
  return _state_core(phi, y_support, jnp.asarray(ridge, dtype), num_steps=num_steps,
                     primal=form == "primal")


@functools.partial(jax.jit, static_argnames=("num_steps", "primal"))
def _state_core(phi, y_support, ridge, *, num_steps, primal):
  if primal:
    trace = solvers.primal_cg(phi, y_support, ridge, num_steps)
    return StateTargets(trace.alpha, trace.r, trace.p, trace.alpha)
  gram = jnp.einsum("bkp,bjp->bkj", phi, phi, precision=checks.HIGHEST)
  a = gram + ridge * jnp.eye(phi.shape[1], dtype=phi.dtype)[None]
  trace = solvers.cg(a, y_support, num_steps)
  w = jnp.einsum("btk,bkp->btp", trace.alpha, phi, precision=checks.HIGHEST)
  return StateTargets(trace.alpha, trace.r, trace.p, w)


def compiled_state_site(compiled: Any, quantity: str) -> str:
  """Where a compiled construction keeps `quantity` ("alpha", "r", "p"; "w" = alpha for primal)."""
  if quantity not in QUANTITIES:
    raise ValueError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}.")
  if quantity == "w":
    return "aggregator"
  return compiled.program.state[quantity].tokens


# ----------------------------------------------------------------------------------------------------
# The probe.
# ----------------------------------------------------------------------------------------------------


class ProbeScore(NamedTuple):
  """Held-out scores of one cross-validated probe.

  Attributes:
    cosine: mean over prompts of the cosine between the held-out prediction and the target.
    cosine_std: standard deviation of that cosine over prompts.
    r2: pooled held-out `1 - SSE / SST` (NaN for constant targets).
    predictions: the held-out predictions `[B, S, M]` (NumPy, in the inputs' dtype).
    rows_per_feature: training rows per varying feature column, the smallest over folds; below 1 the
      fit is underdetermined and a low score may only mean too few prompts (see module doc).
  """

  cosine: float
  cosine_std: float
  r2: float
  predictions: np.ndarray
  rows_per_feature: float


class ProbeResult(NamedTuple):
  """A probe and its controls.

  Attributes:
    score: the probe on the subject's features and the true targets.
    shuffled: the same probe with targets shuffled across prompts (scored against the shuffled targets).
    control: the probe on a randomly initialised model's features (None if not given).
    trivial: a control (shuffled targets, or the random-init model when given) reaches
      `cosine_threshold`, so a cosine above it says nothing about the computation.
    excess_cosine: `score.cosine - max(shuffled.cosine, control.cosine)`.
  """

  score: ProbeScore
  shuffled: ProbeScore
  control: ProbeScore | None
  trivial: bool
  excess_cosine: float


def _check_probe_arrays(features: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
  """Features [B, S, D] and targets [B, S, M] as NumPy arrays of one floating dtype.

  Targets must be finite; features may not be (a random deep model can overflow): such columns are
  dropped by the probe.
  """
  dtype = np.dtype(checks.float_dtype(features, targets))
  checks.check_finite("targets", targets)
  features = np.asarray(features, dtype)
  targets = np.asarray(targets, dtype)
  if features.ndim == 2:
    features = features[:, None, :]
  if targets.ndim == 2:
    targets = targets[:, None, :] if features.shape[1] == 1 else targets[..., None]
  if features.ndim != 3 or targets.ndim != 3:
    raise ValueError(f"features must be [B, S, D] and targets [B, S, M]; got {features.shape} and "
                     f"{targets.shape}.")
  if features.shape[:2] != targets.shape[:2]:
    raise ValueError(f"features {features.shape} and targets {targets.shape} must agree on [B, S] "
                     "(prompts and site tokens); lay targets out with site_targets.")
  return features, targets


def _host_seed(key: Any, *extra: int) -> list[int]:
  """Integers from a PRNG key (typed or raw uint32) for NumPy's generator: host-side draws."""
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.asarray(data).ravel().tolist() + list(extra)


def _fold_ids(key: Any, num_prompts: int, num_folds: int) -> np.ndarray:
  """A random balanced fold id per prompt, drawn from `key` (on the host: no compilation)."""
  if num_folds < 2 or num_folds > num_prompts:
    raise ValueError(f"num_folds must be in [2, number of prompts = {num_prompts}], got {num_folds}.")
  order = np.random.default_rng(_host_seed(key)).permutation(num_prompts)
  folds = np.empty(num_prompts, np.int64)
  folds[order] = np.arange(num_prompts) % num_folds
  return folds


# The probe is a few D x D eigendecompositions per fold: NumPy does it in microseconds, while a jitted
# version would compile anew for every (prompts, tokens, width, target size), which dominated runtime.


def _cross_validated_predictions(features_BxSxD: np.ndarray, targets_BxSxM: np.ndarray,
                                 fold_B: np.ndarray, ridge: float,
                                 num_folds: int) -> tuple[np.ndarray, float]:
  """Held-out predictions [B, S, M] of k-fold ridge probes on standardised features, and the fewest
  training rows per varying feature column over the folds."""
  b, s, d = features_BxSxD.shape
  m = targets_BxSxM.shape[-1]
  dtype = features_BxSxD.dtype
  x = features_BxSxD.reshape(b * s, d)
  y = targets_BxSxM.reshape(b * s, m)
  fold_rows = np.repeat(fold_B, s)
  # Columns that overflowed or are non-finite (a random deep model can blow up) carry no usable signal.
  finite = np.all(np.isfinite(x), axis=0)
  x = np.where(finite[None, :], x, 0).astype(dtype)
  peak = np.max(np.abs(x), axis=0)
  x = x / np.where(peak > 0, peak, 1).astype(dtype)[None, :]
  eps = np.finfo(dtype).eps
  held_out = np.zeros_like(y)
  rows_per_feature = math.inf
  for f in range(num_folds):
    train = fold_rows != f
    n = np.count_nonzero(train)
    mean_x = x[train].mean(axis=0)
    mean_y = y[train].mean(axis=0)
    centred = x - mean_x[None, :]
    std = np.sqrt(np.mean(np.square(centred[train]), axis=0))
    # Columns constant on the training folds (to rounding) are dropped, not blown up to unit scale.
    keep = std > 1e3 * eps * np.max(std)
    rows_per_feature = min(rows_per_feature, n / max(int(np.count_nonzero(keep)), 1))
    z = centred * np.where(keep, 1 / np.where(keep, std, 1), 0).astype(dtype)[None, :]
    gram = z[train].T @ z[train] + dtype.type(ridge * n) * np.eye(d, dtype=dtype)
    rhs = z[train].T @ (y[train] - mean_y[None, :])
    evals, evecs = np.linalg.eigh(gram)
    coef = evecs @ ((evecs.T @ rhs) / evals[:, None])
    test = ~train
    held_out[test] = z[test] @ coef + mean_y[None, :]
  return held_out.reshape(b, s, m), rows_per_feature


def _scores(predictions_BxSxM: np.ndarray, targets_BxSxM: np.ndarray):
  b = predictions_BxSxM.shape[0]
  p = predictions_BxSxM.reshape(b, -1)
  y = targets_BxSxM.reshape(b, -1)
  dot = np.sum(p * y, axis=1)
  norms = np.sqrt(np.sum(p * p, axis=1) * np.sum(y * y, axis=1))
  cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0)
  flat_y = targets_BxSxM.reshape(-1, targets_BxSxM.shape[-1])
  flat_p = predictions_BxSxM.reshape(-1, targets_BxSxM.shape[-1])
  sst = np.sum(np.square(flat_y - np.mean(flat_y, axis=0, keepdims=True)))
  sse = np.sum(np.square(flat_p - flat_y))
  r2 = 1 - sse / sst if sst > 0 else float("nan")
  return float(np.mean(cos)), float(np.std(cos)), float(r2)


def cross_validated_probe(features: Any, targets: Any, key: Any, *, num_folds: int = 5,
                          ridge: float = 1e-6) -> ProbeScore:
  """k-fold (over prompts) ridge probe from `features [B, S, D]` to `targets [B, S, M]`; see module doc.

  Args:
    features: residuals of a site, `[B, S, D]` (or `[B, D]` for one token per prompt).
    targets: `[B, S, M]` (see `site_targets`).
    key: PRNG key for the fold assignment.
    num_folds: folds, 2 <= num_folds <= B.
    ridge: `> 0`, relative to the standardised features (the penalty is `ridge * n |W|^2`).
  """
  features, targets = _check_probe_arrays(features, targets)
  checks.check_ridge(ridge)
  num_folds = checks.check_positive_int("num_folds", num_folds)
  folds = np.asarray(_fold_ids(key, features.shape[0], num_folds))
  feats, targs = np.asarray(features), np.asarray(targets)
  predictions, rows_per_feature = _cross_validated_predictions(feats, targs, folds, float(ridge),
                                                               num_folds)
  cos, cos_std, r2 = _scores(predictions, targs)
  return ProbeScore(cos, cos_std, r2, predictions, rows_per_feature)


def probe(features: Any, targets: Any, key: Any, *, control_features: Any = None, num_folds: int = 5,
          ridge: float = 1e-6, cosine_threshold: float = 0.9) -> ProbeResult:
  """`cross_validated_probe` with its controls (shuffled targets; a random-init model's features).

  The shuffled control permutes the prompts of the targets (features keep their order), so the probe can
  learn only what all prompts share; the random-init control sees the same inputs through a model that
  has learned nothing. `trivial` is True when either reaches `cosine_threshold`.
  """
  features, targets = _check_probe_arrays(features, targets)
  kwargs = dict(num_folds=num_folds, ridge=ridge)
  score = cross_validated_probe(features, targets, key, **kwargs)
  permutation = np.random.default_rng(_host_seed(key, 1)).permutation(targets.shape[0])
  shuffled = cross_validated_probe(features, np.asarray(targets)[permutation], key, **kwargs)
  control = None
  if control_features is not None:
    control_features, _ = _check_probe_arrays(control_features, targets)
    control = cross_validated_probe(control_features, targets, key, **kwargs)
  best_control = float(shuffled.cosine) if control is None else max(float(shuffled.cosine),
                                                                     float(control.cosine))
  return ProbeResult(score, shuffled, control, bool(best_control >= cosine_threshold),
                     float(score.cosine) - best_control)


class LayerProbes(NamedTuple):
  """A probe at every layer; arrays over layers `[L+1]` (index l = after l blocks)."""

  cosine: np.ndarray
  r2: np.ndarray
  shuffled_cosine: np.ndarray
  shuffled_r2: np.ndarray
  control_cosine: np.ndarray
  control_r2: np.ndarray
  trivial: np.ndarray
  rows_per_feature: np.ndarray


def probe_layers(features_LxBxSxD: Any, targets: Any, key: Any, *,
                 control_features_LxBxSxD: Any = None, num_folds: int = 5, ridge: float = 1e-6,
                 cosine_threshold: float = 0.9) -> LayerProbes:
  """`probe` at every layer of `[L+1, B, S, D]` features (e.g. `site_features(residuals(...), ...)`).

  The control features (if given) must have the same number of layers. Controls absent give NaN.
  """
  features = np.asarray(features_LxBxSxD)
  if features.ndim != 4:
    raise ValueError(f"features must be [L+1, B, S, D], got shape {features.shape}.")
  if control_features_LxBxSxD is not None:
    control = np.asarray(control_features_LxBxSxD)
    if control.shape[0] != features.shape[0]:
      raise ValueError(f"control features have {control.shape[0]} layers, the subject {features.shape[0]}.")
  rows = []
  for layer in range(features.shape[0]):
    res = probe(features[layer], targets, key,
                control_features=None if control_features_LxBxSxD is None else control[layer],
                num_folds=num_folds, ridge=ridge, cosine_threshold=cosine_threshold)
    ctrl = res.control
    rows.append((float(res.score.cosine), float(res.score.r2), float(res.shuffled.cosine),
                 float(res.shuffled.r2), math.nan if ctrl is None else float(ctrl.cosine),
                 math.nan if ctrl is None else float(ctrl.r2), res.trivial,
                 res.score.rows_per_feature))
  cols = list(zip(*rows))
  return LayerProbes(*(np.asarray(c, np.float64) for c in cols[:6]), np.asarray(cols[6], bool),
                     np.asarray(cols[7], np.float64))


class ProbeGrid(NamedTuple):
  """Probes of every layer for the state after every step; arrays `[L+1, T+1]` (layer, step)."""

  cosine: np.ndarray
  r2: np.ndarray
  shuffled_cosine: np.ndarray
  control_cosine: np.ndarray
  trivial: np.ndarray
  rows_per_feature: np.ndarray


def probe_grid(features_LxBxSxD: Any, targets_TxBxSxM: Any, key: Any, *,
               control_features_LxBxSxD: Any = None, num_folds: int = 5, ridge: float = 1e-6,
               cosine_threshold: float = 0.9) -> ProbeGrid:
  """`probe_layers` for each of `T+1` targets (e.g. `alpha_t`, t = 0..T), stacked into `[L+1, T+1]`."""
  targets = np.asarray(targets_TxBxSxM)
  if targets.ndim != 4:
    raise ValueError(f"targets must be [T+1, B, S, M] (one target per step), got {targets.shape}.")
  columns = [probe_layers(features_LxBxSxD, targets[t], key,
                          control_features_LxBxSxD=control_features_LxBxSxD, num_folds=num_folds,
                          ridge=ridge, cosine_threshold=cosine_threshold)
             for t in range(targets.shape[0])]
  stack = lambda field: np.stack([getattr(c, field) for c in columns], axis=1)
  return ProbeGrid(stack("cosine"), stack("r2"), stack("shuffled_cosine"), stack("control_cosine"),
                   stack("trivial"), stack("rows_per_feature"))


def probe_subject(subject: Subject, prompts: Any, targets_BxN: Any, site: str, key: Any, *,
                  control: Subject | None = None, num_folds: int = 5, ridge: float = 1e-6,
                  cosine_threshold: float = 0.9) -> LayerProbes:
  """Probes every layer of `subject` (and of `control`) at `site` for `targets_BxN` (see `site_targets`)."""
  num_support = prompts.x_support.shape[1]
  num_query = prompts.x_query.shape[1]
  feats = site_features(residuals(subject, prompts), site, num_support)
  targets = site_targets(targets_BxN, site, num_query)
  ctrl = None if control is None else site_features(residuals(control, prompts), site, num_support)
  return probe_layers(feats, targets, key, control_features_LxBxSxD=ctrl, num_folds=num_folds,
                      ridge=ridge, cosine_threshold=cosine_threshold)


__all__ = (
    "LayerProbes", "ProbeGrid", "ProbeResult", "ProbeScore", "QUANTITIES", "SITES", "StateTargets", "Subject",
    "compiled_state_site", "cross_validated_probe", "predict_fn", "probe", "probe_grid", "probe_layers",
    "probe_subject",
    "random_init_like", "residuals", "site_features", "site_targets", "state_targets",
    "subject_from_compiled", "subject_from_model", "subject_from_trained",
)

"""Property: bad options and bad prompts get a ValueError that names what is wrong, for every
construction of the table; nothing is compiled or predicted silently wrong."""

import jax
import numpy as np
import pytest

import construction_table as table
import kcg

K, D, Q, T = 5, 3, 2, 2
RIDGE = 0.3
_RELU = kcg.features.random_relu(6)
_RELU_PARAMS = _RELU.init(jax.random.key(0), 3)

# (compile_cg arguments, keyword options, the message the ValueError must contain).
BAD_OPTIONS = [
    *[((4, 2, 2, ridge), {}, "ridge") for ridge in (0.0, -1.0, float("nan"), float("inf"), "0.1",
                                                     True, None)],
    ((4, 2, -1, 0.1), {}, "num_steps"),
    ((4, 2, 1.5, 0.1), {}, "num_steps"),
    ((0, 2, 1, 0.1), {}, "num_support"),
    ((4, 0, 1, 0.1), {}, "feature_dim"),
    ((4, 2, 1, 0.1), dict(mask="bidirectional"), "mask"),
    ((4, 2, 1, 0.1), dict(form="normal"), "form"),
    ((4, 2, 1, 0.1), dict(attention="cosine"), "attention"),
    ((4, 2, 1, 0.1), dict(features="fourier"), "features"),
    ((4, 2, 1, 0.1), dict(state_placement="everywhere"), "state_placement"),
    ((4, 2, 1, 0.1), dict(mask="causal", form="dual", state_placement="support"),
     "a support cannot read later ones"),
    # Feature layers.
    ((4, 6, 2, 0.1), dict(features="random_relu"), "feature_params"),
    ((4, 5, 2, 0.1), dict(features="random_relu", feature_params=_RELU_PARAMS), "feature_dim=5"),
    ((4, 6, 2, 0.1), dict(features="random_relu", feature_params=_RELU_PARAMS, input_dim=4),
     "input_dim=4"),
    ((4, 6, 2, 0.1), dict(feature_params=_RELU_PARAMS), "only used"),
    ((4, 2, 2, 0.1), dict(input_dim=3), "input_dim == feature_dim"),
    ((4, 2, 2, 0.1), dict(projection=np.ones((2, 3))), "projection"),
    ((4, 2, 2, 0.1), dict(projection=np.full((1, 2), np.nan)), "NaN"),
    # Preconditioner.
    ((4, 2, 2, 0.1), dict(mask="causal", preconditioner="jacobi"), "mask='prefix'"),
    ((4, 2, 2, 0.1), dict(mask="prefix", form="primal", preconditioner="jacobi"), "form='dual'"),
    ((4, 2, 2, 0.1), dict(mask="prefix", preconditioner="ilu"), "preconditioner"),
    # Softmax routes.
    ((4, 2, 2, 0.1), dict(mask="prefix", attention="softmax"), "temperature"),
    ((4, 2, 2, 0.1), dict(mask="prefix", attention="softmax", temperature=-1.0),
     "temperature must be"),
    ((4, 2, 2, 0.1), dict(mask="causal", attention="softmax", temperature=1.0), "mask='prefix'"),
    ((4, 2, 2, 0.1), dict(mask="prefix", attention="softmax", kernel="linear", temperature=10.0,
                          temperature_heads=0), "temperature_heads"),
    ((4, 2, 2, 0.1), dict(mask="prefix", attention="softmax", temperature=1.0,
                          projection=np.ones((2, 3))), "projection"),
    ((4, 2, 2, 0.1), dict(kernel="exponential"), "needs attention='softmax'"),
    ((4, 2, 2, 0.1), dict(temperature=1.0), "option of attention='softmax'"),
    ((4, 2, 2, 0.1), dict(mask="prefix", attention="softmax", kernel="cosine", temperature=1.0),
     "kernel"),
    # Several outputs.
    *[((4, 2, 1, 0.1), dict(num_outputs=bad), "num_outputs must be a positive int")
      for bad in (0, -1, True, 1.5, "2")],
    ((4, 2, 1, 0.1), dict(num_outputs=2, multi_output="chol"), "multi_output='chol' is not one of"),
    ((4, 2, 1, 0.1), dict(num_outputs=2, multi_output="block", mask="causal"), "block CG"),
    # Pre-norm.
    ((4, 2, 1, 0.1), dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    *[((4, 2, 1, 0.1), dict(norm="layernorm", **entry.options), "norm='layernorm' cannot carry CG")
      for entry in table.ENTRIES.values() if entry.solver != "chebyshev"
      and "norm" not in entry.options and entry.features == "identity"],
]


@pytest.mark.parametrize("args,options,match", BAD_OPTIONS,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_compile_cg_refuses_bad_options(args, options, match):
  with pytest.raises(ValueError, match=match):
    kcg.compile_cg(*args, **options)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0, float("inf")), None, (1.0,)])
def test_compile_chebyshev_refuses_bad_bounds(bounds):
  with pytest.raises(ValueError, match="eig_bounds"):
    kcg.compile_chebyshev(4, 2, 2, 0.1, eig_bounds=bounds)


def test_compile_chebyshev_refuses_bad_options():
  with pytest.raises(ValueError, match="ridge"):
    kcg.compile_chebyshev(4, 2, 2, 0.0, eig_bounds=(0.1, 1.0))
  with pytest.raises(ValueError, match="norm='groupnorm'"):
    kcg.compile_chebyshev(4, 2, 1, 0.1, eig_bounds=(0.1, 10.0), norm="groupnorm")


@pytest.mark.parametrize("options,match", [
    (dict(num_outputs=0), "num_outputs"),
    (dict(num_outputs=2, multi_output="block", mask="causal"), "block"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mask="prefix", preconditioner="ilu"), "preconditioner"),
    (dict(mask="causal", preconditioner="jacobi"), "jacobi"),
    (dict(mask="causal", state_placement="support"), "state_placement"),
])
def test_dimensions_refuses_what_compile_cg_refuses(options, match):
  with pytest.raises(ValueError, match=match):
    kcg.dimensions(4, 2, 1, **options)
  with pytest.raises(ValueError, match=match):
    kcg.compile_cg(4, 2, 1, 0.1, **options)


@pytest.mark.parametrize("name", list(table.ENTRIES))
def test_predict_refuses_prompts_that_do_not_match(name):
  entry = table.ENTRIES[name]
  compiled = table.compiled(entry, K, D, T, RIDGE)
  xs, ys, xq = table.prompts(entry, K, D, Q, seed=0)
  with pytest.raises(ValueError, match=f"num_support={K}"):
    compiled.predict(np.concatenate([xs, xs[:, :1]], 1), np.concatenate([ys, ys[:, :1]], 1), xq)
  with pytest.raises(ValueError, match=f"input_dim={D}"):
    compiled.predict(xs[..., :-1], ys, xq[..., :-1])
  with pytest.raises(ValueError, match="y_support"):
    compiled.predict(xs, ys[:, :-1], xq)
  with pytest.raises(ValueError, match="x_query"):
    compiled.predict(xs, ys, xq[0])
  for bad in (xs, ys, xq):
    original = bad.flat[0]
    bad.flat[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
      compiled.predict(xs, ys, xq)
    bad.flat[0] = original

"""The optimizer of a training run: AdamW on a warmup + cosine (or constant) learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kcg._src import train_config as config_lib


def learning_rate_schedule(optim: config_lib.OptimSpec, num_steps: int) -> optax.Schedule:
  """count -> learning rate: linear warmup from 0 over `warmup_steps`, then a cosine decay from `lr` to
  `final_learning_rate_fraction * lr` at `num_steps` ("cosine"), or `lr` ("constant").

  The schedule is a function of the count and `num_steps` only, so a run extended to more steps
  (`kcg.training.train` after raising `num_steps`) continues from its restored count on the schedule
  of the new `num_steps`: constant stays constant; the cosine jumps from the end value of the old
  horizon to its value at that count on the new one (10000 -> 12000 steps, no warmup, final fraction
  0: from 0 to `0.5 (1 + cos(pi 10000 / 12000)) lr = 0.067 lr`) and decays to the final value at the
  new end.

  Written out rather than taken from optax so that it computes in float32 from an integer count
  under `jax_numpy_dtype_promotion="strict"` (optax's schedules mix Python floats and int32).
  """
  lr, final = optim.learning_rate, optim.final_learning_rate_fraction
  warmup = min(optim.warmup_steps, num_steps)
  decay_steps = max(num_steps - warmup, 1)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    scale = jnp.minimum(step / warmup, 1.0) if warmup > 0 else jnp.ones((), jnp.float32)
    if optim.schedule == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      scale = scale * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return lr * scale

  return schedule


def decay_mask(params):
  """Weight decay on weight matrices only: not on biases or norm scales."""

  def decays(path, _):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    name = names[-1] if names else ""
    return not ("bias" in name or "norm" in name)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: config_lib.TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (optional) followed by AdamW on the schedule."""
  optim = config.optim
  adamw = optax.adamw(learning_rate_schedule(optim, config.num_steps), b1=optim.b1, b2=optim.b2,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)

"""Trains an in-context learner: `python -m experiments.train --config=experiments/configs/<name>.py
--workdir=DIR`.

Writes DIR/config.json, DIR/metrics.jsonl, orbax checkpoints under DIR/checkpoints, and at the end
DIR/eval.json, DIR/loss.png and DIR/error_vs_supports.png. Rerunning with the same DIR resumes from
the newest verified checkpoint and reproduces the uninterrupted run exactly; rerunning a finished run
with a larger `--config.num_steps` extends it. Load the result with `kcg.load_trained(DIR)`.

Exits non-zero at the first step with a non-finite loss or gradient, naming the step (no checkpoint
after it is written).

Several hosts: start the same command on every host with `--distributed` (which calls
`jax.distributed.initialize()`, reading the coordinator from the environment, e.g. on Slurm or TPU
pods); the data mesh then spans all hosts' devices.
"""

import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host runs).")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Stop after this step, checkpointed, as if pre-empted (for testing resume).")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_override(argv: list[str], fields: dict) -> str | None:
  """The first `--config.a.b=...` of `argv` that names no field of `fields` (nested dicts), as a
  message naming it and the valid fields there; None if every override names a field."""
  for arg in argv:
    match = re.match(r"^--?config\.([^=\s]+)", arg)
    if not match:
      continue
    node, path = fields, []
    for name in match.group(1).split("."):
      if not isinstance(node, dict) or name not in node:
        where = f"config.{'.'.join(path)}" if path else "the config"
        valid = sorted(node) if isinstance(node, dict) else []
        return (f"--config.{match.group(1)}: {where} has no field {name!r}"
                + (f"; valid fields: {', '.join(valid)}." if valid else "."))
      node, path = node[name], path + [name]
  return None


def _parse_flags(argv):
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    # ml_collections reports an override of a missing field as a bare AttributeError.
    from kcg import training  # pylint: disable=g-import-not-at-top
    message = unknown_override(argv[1:], training.config_to_dict(training.TrainConfig()))
    if message is None:
      raise
    sys.exit(f"FATAL Flags parsing error: {message}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from kcg import training  # pylint: disable=g-import-not-at-top

  # orbax logs every save step at INFO; keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  config = training.config_from_dict(_CONFIG.value)
  logging.info("Devices: %s", jax.devices())
  try:
    result = training.train(config, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value)
  except training.DivergenceError as e:
    logging.error("%s", e)
    sys.exit(f"FATAL {e}")
  logging.info("Stopped at step %d of %d; outputs in %s.", result.step, config.num_steps,
               _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

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

from __future__ import annotations

import sys

from absl import flags
from absl import logging
import jax

from experiments import _cli
import kcg


def _flags() -> dict[str, flags.FlagHolder]:
  return {
      "distributed": flags.DEFINE_bool(
          "distributed", False, "Call jax.distributed.initialize() first (multi-host runs)."),
      "stop_at_step": flags.DEFINE_integer(
          "stop_at_step", None,
          "Stop after this step, checkpointed, as if pre-empted (for testing resume)."),
  }


def run(config, workdir: str, *, distributed: bool = False,
        stop_at_step: int | None = None) -> kcg.training.TrainResult:
  """Converts the ml_collections config (`kcg.training.config_from_dict`) and trains into workdir."""
  if distributed:
    jax.distributed.initialize()
  # orbax logs every save step at INFO; keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  train_config = kcg.training.config_from_dict(config)
  logging.info("Devices: %s", jax.devices())
  try:
    result = kcg.training.train(train_config, workdir, stop_at_step=stop_at_step)
  except kcg.training.DivergenceError as e:
    logging.error("%s", e)
    sys.exit(f"FATAL {e}")
  logging.info("Stopped at step %d of %d; outputs in %s.", result.step, train_config.num_steps,
               workdir)
  return result


if __name__ == "__main__":
  _cli.run_main(run, None, "checkpoints, metrics and plots", extra_flags=_flags)

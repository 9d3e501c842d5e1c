"""Trains an in-context learner: `python -m experiments.train --config=experiments/configs/<name>.py
--workdir=DIR`.

Writes DIR/config.json, DIR/metrics.jsonl, orbax checkpoints under DIR/checkpoints, and at the end
DIR/eval.json, DIR/loss.png and DIR/error_vs_supports.png. Rerunning with the same DIR resumes from
the latest checkpoint and reproduces the uninterrupted run exactly. Load the result with
`kcg.load_trained(DIR)`.

Several hosts: start the same command on every host with `--distributed` (which calls
`jax.distributed.initialize()`, reading the coordinator from the environment, e.g. on Slurm or TPU
pods); the data mesh then spans all hosts' devices.
"""

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from kcg._src import training  # pylint: disable=g-import-not-at-top

  # orbax logs every save step at INFO; keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  config = training.config_from_dict(_CONFIG.value)
  logging.info("Devices: %s", jax.devices())
  result = training.train(config, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value)
  logging.info("Stopped at step %d of %d; outputs in %s.", result.step, config.num_steps,
               _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

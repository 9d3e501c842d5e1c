"""The absl entry point every experiment binary shares: --config (ml_collections file) and --workdir."""

from __future__ import annotations

from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags


def run_main(run: Callable[[object, str], dict], default_config: str, outputs: str) -> None:
  """Defines --config/--workdir (only when called from a script's __main__) and runs `run`."""
  config_flags.DEFINE_config_file(
      "config", default_config, "Experiment config (append ':runlocal' for the tiny variant).")
  flags.DEFINE_string("workdir", None, f"Directory for {outputs}.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
      raise app.UsageError("--workdir is required.")
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)

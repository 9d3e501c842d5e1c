"""The absl entry point every experiment binary shares: --config (ml_collections file) and --workdir.

Every binary ends with

    if __name__ == "__main__":
      _cli.run_main(run, DEFAULT_CONFIG_OR_NONE, "what it writes", extra_flags=...)

and keeps its work in `run(config, workdir, **extras)`, which the tests call directly. Flags are
defined only when the binary runs as a script, so importing several binaries into one process (as
the test suite does) never defines a flag twice.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import app
from absl import flags
from ml_collections import config_flags


def run_main(run: Callable[..., Any], default_config: str | None, outputs: str, *,
             extra_flags: Callable[[], Mapping[str, flags.FlagHolder]] | None = None) -> None:
  """Defines --config and --workdir (and `extra_flags()`), parses argv, calls `run`.

  Args:
    run: `run(config, workdir, **{name: value of each extra flag})`.
    default_config: the config file used when --config is not given; None makes --config required.
    outputs: what the binary writes into --workdir (for --help).
    extra_flags: defines the binary's own flags and returns them by the keyword `run` takes.
  """
  config_flags.DEFINE_config_file(
      "config", default_config, "Experiment config file, `path.py[:option]` (':runlocal' or ':smoke': a tiny variant).")
  flags.DEFINE_string("workdir", None, f"Directory for {outputs}.")
  extras = dict(extra_flags()) if extra_flags is not None else {}

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
      raise app.UsageError("--config is required (e.g. --config=experiments/configs/NAME.py).")
    if not flags.FLAGS.workdir:
      raise app.UsageError("--workdir is required.")
    run(flags.FLAGS.config, flags.FLAGS.workdir, **{name: f.value for name, f in extras.items()})

  app.run(main)

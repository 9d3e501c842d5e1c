"""The absl entry point every experiment binary shares: --config (ml_collections file) and --workdir.

Every binary ends with

    if __name__ == "__main__":
      _cli.run_main(run, DEFAULT_CONFIG_OR_NONE, "what it writes", extra_flags=...)

and keeps its work in `run(config, workdir, **extras)`, which the tests call directly. Flags are
defined only when the binary runs as a script, so importing several binaries into one process (as
the test suite does) never defines a flag twice.
"""

from __future__ import annotations

import re
import runpy
import sys
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

  app.run(main, flags_parser=_parse_flags)


def unknown_override(argv: list[str], fields: Mapping[str, Any]) -> str | None:
  """The first `--config.a.b=...` of `argv` that names no field of `fields` (nested dicts), as a
  message naming it and the valid fields there; None if every override names a field."""
  for arg in argv:
    match = re.match(r"^--?config\.([^=\s]+)", arg)
    if not match:
      continue
    node, path = fields, []
    for name in match.group(1).split("."):
      if not isinstance(node, Mapping) or name not in node:
        where = f"config.{'.'.join(path)}" if path else "the config"
        valid = sorted(node) if isinstance(node, Mapping) else []
        return (f"--config.{match.group(1)}: {where} has no field {name!r}"
                + (f"; valid fields: {', '.join(valid)}." if valid else "."))
      node, path = node[name], path + [name]
  return None


def _config_fields(argv: list[str]) -> Mapping[str, Any] | None:
  """The fields of the config file that `--config=path.py[:arg]` in argv names, as nested dicts."""
  for arg in argv:
    match = re.match(r"^--?config=([^:]+)(?::(.*))?$", arg)
    if match:
      module = runpy.run_path(match.group(1))
      config = module["get_config"](match.group(2)) if match.group(2) else module["get_config"]()
      return config.to_dict()
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    # ml_collections reports an override of a missing field as a bare AttributeError / KeyError.
    fields = _config_fields(argv[1:])
    message = None if fields is None else unknown_override(argv[1:], fields)
    if message is None:
      raise
    sys.exit(f"FATAL Flags parsing error: {message}")

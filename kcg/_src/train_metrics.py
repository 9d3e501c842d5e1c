"""The metrics file of a run, `workdir/metrics.jsonl`: one JSON record per line, appended as it trains.

Training records carry `step, loss, grad_norm, learning_rate, steps_per_sec, input_dim, num_support`;
evaluation records `step, eval_mse, eval_mse_observed` (and what an `evaluate_fn` adds).
"""

from __future__ import annotations

import json
import os

from absl import logging

METRICS_FILE = "metrics.jsonl"


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def _parse(path: str, lines: list[str]) -> tuple[list[dict], bool]:
  """Records of `lines`, and whether the last line was cut off (a run killed mid-write)."""
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        return records, True
      raise ValueError(f"{path} line {number} is not a JSON record ({e}); the file is damaged. "
                       "Delete that line, or the file to start the metrics afresh.") from None
  return records, False


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return [line for line in f if line.strip()]


def load_history(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order (a last line cut off by a kill is left out)."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: {workdir!r} holds no training metrics.")
  records, _ = _parse(path, _read_lines(path))
  return records


def truncate_history(workdir: str, step: int) -> None:
  """Drops records after `step` (logged by a run killed after its last checkpoint) and a last line
  cut off mid-write, so that a resumed run's metrics.jsonl reads like an uninterrupted one."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return
  lines = _read_lines(path)
  records, torn = _parse(path, lines)
  if torn:
    logging.warning("Dropping the last line of %s: cut off by an interrupted write.", path)
  kept = [line for line, record in zip(lines, records) if record["step"] <= step]
  if torn or len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)

"""The markdown report the experiment binaries write: `report.md` with figures, and `results.json`."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import kcg


class Report:
  """Collects markdown sections, figures and numbers; `write` saves report.md and results.json.

  `lines` are the markdown lines so far (a binary may splice a generated summary in), `results`
  the JSON-ready numbers added with `add`, `figures` the PNG file names shown.
  """

  def __init__(self, workdir: str, title: str):
    self.workdir = workdir
    self.lines = [f"# {title}", ""]
    self.results: dict[str, Any] = {}
    self.figures: list[str] = []
    os.makedirs(workdir, exist_ok=True)

  def path(self, filename: str) -> str:
    """Where a file of the report goes: `workdir/filename`."""
    return os.path.join(self.workdir, filename)

  def section(self, title: str, text: str = "") -> None:
    """A `##` heading, optionally followed by a paragraph."""
    self.lines += [f"## {title}", ""] + ([text, ""] if text else [])

  def text(self, text: str) -> None:
    """A paragraph."""
    self.lines += [text, ""]

  def figure(self, filename: str, caption: str) -> None:
    """An image already written to `workdir/filename`, with its caption; ValueError if missing."""
    if not os.path.exists(self.path(filename)):
      raise ValueError(f"figure {filename} was not written to {self.workdir}.")
    self.figures.append(filename)
    self.lines += [f"![{caption}]({filename})", "", f"*{caption}*", ""]

  def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A markdown table; floats with 3 significant digits."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    self.lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    self.lines.append("")

  def add(self, name: str, value: Any) -> Any:
    """Stores `value` (made JSON-ready by `kcg.study.jsonable`) under `name`; returns it unchanged."""
    self.results[name] = kcg.study.jsonable(value)
    return value

  def write(self, config: Mapping[str, Any]) -> tuple[str, str]:
    """Appends the configuration and writes report.md and results.json; returns their paths."""
    config_json = json.dumps(kcg.study.jsonable(config), indent=2, sort_keys=True)
    self.lines += ["## Configuration", "", "```json", config_json, "```", ""]
    report_path, results_path = self.path("report.md"), self.path("results.json")
    with open(report_path, "w") as f:
      f.write("\n".join(self.lines))
    with open(results_path, "w") as f:
      json.dump({"config": kcg.study.jsonable(config), "results": self.results}, f, indent=1)
    return report_path, results_path

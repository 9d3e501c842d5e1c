"""Every notebook in colabs/ runs headless, top to bottom, and is saved without outputs; its first
code cell installs kcg on Colab only, from the repository the README's "Open in Colab" links name."""

import os
import pathlib
import re
import subprocess
import sys
import types

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
REPOSITORY = re.compile(r'^KCG_REPOSITORY = "https://github\.com/([^"/]+/[^"/]+)"$', re.M)


def _install_cell(path) -> str:
  notebook = nbformat.read(path, as_version=4)
  return next(c for c in notebook.cells if c.cell_type == "code").source


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name} has saved outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_runs_pip_only_on_colab(path, monkeypatch):
  source = _install_cell(path)
  (repository,) = REPOSITORY.findall(source)
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
  monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  exec(compile(source, path.name, "exec"), {})  # pylint: disable=exec-used
  assert not calls, "the install cell ran outside Colab"
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  exec(compile(source, path.name, "exec"), {})  # pylint: disable=exec-used
  (args,) = calls
  assert args[1:4] == ["-m", "pip", "install"]
  assert re.fullmatch(rf"kcg(\[\w+\])? @ git\+https://github\.com/{re.escape(repository)}", args[-1])


def test_readme_opens_every_notebook_in_colab_from_the_install_cells_repository():
  readme = (ROOT / "README.md").read_text()
  links = dict((name, repo) for repo, name in re.findall(
      r"\(https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/colabs/([^)]+)\)",
      readme))
  assert set(links) == {p.name for p in NOTEBOOKS}
  for path in NOTEBOOKS:
    (repository,) = REPOSITORY.findall(_install_cell(path))
    assert links[path.name] == repository, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_headless(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("KCG_NOTEBOOK_WORKDIR", str(tmp_path))
  # The kernel imports this checkout's kcg and experiments, whatever kcg is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()

"""The API reference: every public name has a docstring, every public module has a page, the site
builds with `mkdocs build --strict` (a broken reference or a docstring naming a parameter the
signature lacks fails it), and the guides' Python blocks run."""

import inspect
import os
import pathlib
import re
import subprocess
import sys
import types
import typing

import pytest

import kcg

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = sorted(n for n in kcg.__all__ if isinstance(getattr(kcg, n), types.ModuleType))
TOP_LEVEL = sorted(n for n in kcg.__all__ if n not in PUBLIC_MODULES)


def _has_own_docstring(obj) -> bool:
  doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
  if not doc or not doc.strip():
    return False
  # namedtuple and dataclass write "Name(field, ...)" into a class that has no docstring.
  return not (isinstance(obj, type) and doc.startswith(obj.__name__ + "("))


def _undocumented(qualname: str, obj) -> list[str]:
  """`qualname` and its public methods and properties that lack a docstring."""
  if isinstance(obj, types.ModuleType):
    return [] if _has_own_docstring(obj) else [qualname]
  if isinstance(obj, type):
    missing = [] if _has_own_docstring(obj) else [qualname]
    for name, member in vars(obj).items():
      if name.startswith("_"):
        continue
      fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
      if (inspect.isfunction(fn) or isinstance(member, property)) and not (fn.__doc__ or "").strip():
        missing.append(f"{qualname}.{name}")
    return missing
  # Functions (plain, jitted, partial); constants and type aliases hold no docstring of their own.
  if callable(obj) and typing.get_origin(obj) is None:
    return [] if _has_own_docstring(obj) else [qualname]
  return []


def _public_names():
  for name in kcg.__all__:
    obj = getattr(kcg, name)
    yield f"kcg.{name}", obj
    if isinstance(obj, types.ModuleType):
      for member in obj.__all__:
        yield f"kcg.{name}.{member}", getattr(obj, member)


def test_every_public_name_has_a_docstring():
  missing = [m for qualname, obj in _public_names() for m in _undocumented(qualname, obj)]
  assert not missing, f"public names without a docstring: {missing}"


def test_docstring_check_catches_a_missing_one():
  def documented():
    """Does something."""

  def bare():
    pass

  class Plain(typing.NamedTuple):
    x: int

    @property
    def twice(self) -> int:
      return 2 * self.x

  assert _undocumented("documented", documented) == []
  assert _undocumented("bare", bare) == ["bare"]
  assert _undocumented("Plain", Plain) == ["Plain", "Plain.twice"]
  assert _undocumented("Predictor", kcg.baselines.Predictor) == []  # a type alias


def test_api_reference_covers_every_public_name():
  nav = (ROOT / "mkdocs.yml").read_text()
  for name in PUBLIC_MODULES:
    page = DOCS / "api" / f"{name}.md"
    assert page.exists() and f"::: kcg.{name}\n" in page.read_text(), f"no API page for kcg.{name}"
    assert f"api/{name}.md" in nav, f"kcg.{name}'s page is not in mkdocs.yml's nav"
  listed = re.findall(r"^ +- (\w+)$", (DOCS / "api" / "kcg.md").read_text(), re.M)
  assert sorted(listed) == TOP_LEVEL


def test_site_builds_strict(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  built = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
       "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert built.returncode == 0, built.stderr[-3000:]
  page = (tmp_path / "site" / "api" / "solvers" / "index.html").read_text()
  assert "cg_predict" in page and "Conjugate gradient" in page  # re-exported names are rendered


@pytest.mark.parametrize("guide", ["compile.md", "train.md", "compare.md"])
def test_guide_code_runs(guide, tmp_path, monkeypatch):
  """Each guide's ```python blocks, in order, in one namespace (training writes under tmp_path)."""
  monkeypatch.chdir(tmp_path)
  blocks = re.findall(r"```python\n(.*?)```", (DOCS / guide).read_text(), re.S)
  assert blocks
  namespace = {}
  for block in blocks:
    exec(compile(block, guide, "exec"), namespace)  # pylint: disable=exec-used

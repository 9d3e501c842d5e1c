"""Typed identities of compiled programs: what a head or block computes, which construction it is."""

from kcg._src.ops import Construction
from kcg._src.ops import Op
from kcg._src.ops import Transform

__all__ = ("Construction", "Op", "Transform")

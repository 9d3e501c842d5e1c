"""Global numerics for the test suite: float64, strict dtype promotion, rank promotion raises.

Tests that exercise float32 on purpose cast explicitly; everything else runs in float64 so that
tolerances can be stated from float64 rounding and the problem's condition number.
"""
import os

# Four host devices for the data-parallel tests. (XLA's --xla_backend_optimization_level=0 would
# halve compile time, but it changes rounding inside fused kernels: tests must check the numerics
# users run.)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops jax's compiled executables after each test module.

  Each executable keeps a few memory mappings for its machine code. A serial run of the whole suite
  compiles tens of thousands of them and passes Linux's default limit of 65530 mappings per
  process (vm.max_map_count), after which XLA segfaults inside a compile.
  """
  yield
  jax.clear_caches()
  gc.collect()

"""Test session set-up: fake CPU devices (8, so that the sharding tests run on this CPU-only machine,
or SEQMIX_TEST_DEVICES of them), XLA:CPU code compiled without LLVM's optimisations, and one
persistent compilation cache for the run.

`make test` gives one device to the groups that build no mesh: a run there trains on one device,
as a user's does on a machine with one, instead of splitting each batch over 8 devices that share
the two cores (the trainer's tests took about an eighth less time). The modules that need 8
devices carry the `eight_devices` mark and fail at once, saying so, in a process with fewer.

XLA reads the flag once, when jax initialises its backend, so it is set before anything imports jax.
Many tests compile the same programs (the smoke model's train step in a dozen Trainers, the CLI
subprocesses' steps): with the cache, which the three test groups and their subprocesses share
(it lives in .cache/, which `make clean` removes), a fresh clone's suite spends about a third less
CPU on the tests measured (test_trainer and test_checkpoint: 94 s -> 62 s). It keeps every program,
however quick to compile: building a model runs its initialisers op by op, each op a program of
its own of 20-100 ms per shape, which every test module compiled again after the caches were
dropped (below). Keeping those too took a tenth off the CPU time of the layers' tests and four
mixers' (cold caches, one process: 103-106 s -> 92-95 s, 2026-12-05).
"""

import os
from pathlib import Path

# LLVM's optimisations of XLA:CPU's code cost compile time the tests' tiny shapes never earn back:
# without them the kernels' tests took 116 s instead of 150 s, the mixers' gradient tests 15 s
# instead of 24 s (cold caches, 2026-12-02). The library and its benchmarks keep them.
DEVICES = os.environ.get("SEQMIX_TEST_DEVICES", "8")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={DEVICES}",
     "--xla_backend_optimization_level=0"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gc  # noqa: E402  (after the environment above, which jax reads when it is first imported)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_released_after_each_module():
    """XLA:CPU maps each compiled program's code into the process, about 2,000 memory maps per test
    module, and a test group that keeps them all passes the kernel's limit (vm.max_map_count,
    65530) and crashes with a segmentation fault inside a late compilation. Dropping jax's caches
    after each module unmaps them (measured: 5,610 maps -> 620); a program the next module
    compiles again comes back from the persistent cache above."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_runtest_setup(item):
    if item.get_closest_marker("eight_devices") and jax.device_count() < 8:
        pytest.fail(f"{item.nodeid} needs 8 devices and this process has {jax.device_count()}: "
                    "run it with SEQMIX_TEST_DEVICES=8 (the default)", pytrace=False)

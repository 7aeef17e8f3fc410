"""Test session set-up: 8 fake CPU devices, so sharding tests run on this CPU-only machine.

XLA reads the flag once, when jax initialises its backend, so it is set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

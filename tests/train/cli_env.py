"""The environment of the `seqmix` processes the tests start: CPU devices (one unless told) and,
as in conftest.py, XLA:CPU code compiled without LLVM's optimisations, which the tests' tiny
programs never earn back (the code run is the same; only the compiler works less)."""

import os


def cli_env(devices: int = 1) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}

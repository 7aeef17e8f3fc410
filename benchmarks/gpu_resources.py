"""The Pallas GPU kernels' resources on Hopper, found on a CPU: shared memory, registers and spills.

Each family's forward and backward kernels are lowered by jax for an abstract H100
(`registry.lower_for_device`), and the Triton IR of each is compiled by the
`triton` package for sm_90, with the warps and pipeline stages the kernel asks for; its `ptxas -v`
gives registers, stack frame and spills. No GPU is needed, so a lent GPU's minutes need not find
what this finds: a kernel whose shared memory exceeds the 227 KiB a Hopper block can have does not
launch, and one that spills moves its state through local memory.

    pip install triton==3.6.0   # the CUDA machines' version; XLA compiles with its own Triton
    python benchmarks/gpu_resources.py [--family gla delta kda dplr] [--dims 64 128] \
        [--warps 16] [--value-block 128]

--warps and --value-block compile the kernels with other settings than `sweep_gpu`'s NUM_WARPS and
VALUE_BLOCK (the value columns a program holds), to compare them without editing the library.

The figures are Triton 3.6's; XLA's bundled Triton may allocate somewhat differently. The kernels
hold a (batch, head)'s [V, K] float32 state in registers (`sweep_gpu`), so K and V set the
pressure; the sequence length sets only loop bounds. The Triton IR is taken from jax's private
lowering hook (`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`).
"""

import argparse
import os
import re
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import triton
from jax._src.pallas.triton import lowering as triton_lowering
from triton.backends.compiler import GPUTarget

from kernels import FAMILIES, random_inputs
from seqmix.pallas_kernels import registry, sweep_gpu

HOPPER_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may opt into on sm_90
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def triton_modules(family_name: str, dim: int, length: int = 256, heads: int = 4) -> list[tuple[str, str, int, int]]:
    """(kernel name, Triton IR text, num_warps, num_stages) of the family's forward and backward
    kernels at K = V = dim, bf16 inputs, lowered for an H100."""
    family = FAMILIES[family_name]
    modules = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def keep_module(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    q, k, v, extras = random_inputs(np.random.default_rng(0), family, family.gates[0], (1, length, heads, dim),
                                    heads, jnp.bfloat16)
    loss = lambda q, k, v, extras: jnp.sum(family.op(q, k, v, **extras, impl="pallas_gpu").astype(jnp.float32))
    triton_lowering.lower_jaxpr_to_triton_module = keep_module
    try:
        text = registry.lower_for_device(jax.grad(loss, argnums=(0, 1, 2, 3)), (q, k, v, extras), "gpu").as_text()
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
    configs = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    assert len(configs) == len(modules), (configs, len(modules))
    return [(name, module, int(warps), int(stages)) for (name, stages, warps), module in zip(configs, modules)]


def resources(module: str, num_warps: int, num_stages: int) -> dict:
    """Compiles Triton IR for sm_90: shared bytes, and ptxas's registers, stack frame and spills."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ttir")
        with open(source, "w") as file:
            file.write(module)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as file:
            file.write(kernel.asm["ptx"])
        report = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, report).group(1))
    return dict(shared=kernel.metadata.shared, registers=number(r"Used (\d+) registers"),
                stack=number(r"(\d+) bytes stack frame"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="K = V")
    parser.add_argument("--warps", type=int, default=sweep_gpu.NUM_WARPS)
    parser.add_argument("--value-block", type=int, default=sweep_gpu.VALUE_BLOCK)
    args = parser.parse_args()
    sweep_gpu.NUM_WARPS, sweep_gpu.VALUE_BLOCK = args.warps, args.value_block
    print(f"# Pallas GPU kernels compiled for sm_90 by Triton {triton.__version__} (jax {jax.__version__}), "
          "bf16 inputs")
    print(f"| family | kernel | K = V | V per program | warps, stages | shared KiB (of {HOPPER_SHARED_BYTES // 1024}) "
          "| registers | stack frame B | spill stores B | spill loads B | compile s |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for family_name in args.family:
        for dim in args.dims:
            for name, module, warps, stages in triton_modules(family_name, dim):
                start = time.perf_counter()
                found = resources(module, warps, stages)
                over = " (over)" if found["shared"] > HOPPER_SHARED_BYTES else ""
                print(f"| {family_name} | {name} | {dim} | {sweep_gpu.value_block(dim)} | {warps}, {stages} "
                      f"| {found['shared'] / 1024:.1f}{over} "
                      f"| {found['registers']} | {found['stack']} | {found['spill_stores']} | {found['spill_loads']} "
                      f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Joining a multi-process run through JAX's own distributed runtime (`jax.distributed`).

Each process of a run is launched with the same command plus its place in the run: the
coordinator's address (host:port of process 0), the number of processes and its own id, as
arguments or as the environment variables SEQMIX_COORDINATOR, SEQMIX_NUM_PROCESSES and
SEQMIX_PROCESS_ID. From there on the run is one SPMD program over every process's devices:
each process loads its rows of every batch, and all of them write the checkpoints together.
"""

from __future__ import annotations

import os

import jax

from seqmix.configuration import ConfigError

ENVIRONMENT = {"coordinator": "SEQMIX_COORDINATOR", "num_processes": "SEQMIX_NUM_PROCESSES",
               "process_id": "SEQMIX_PROCESS_ID"}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_seconds: int = 300) -> None:
    """Starts `jax.distributed` when this process is one of several (`num_processes` > 1); does
    nothing for a single process. Must run before anything touches a device. Arguments left
    None come from the environment; a partial set is an error that names what is missing."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for name, value in given.items():
        if value is None and ENVIRONMENT[name] in os.environ:
            given[name] = os.environ[ENVIRONMENT[name]]
    if given["num_processes"] is None or int(given["num_processes"]) == 1:
        return
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(f"distributed: {given['num_processes']} processes need --{missing[0].replace('_', '-')} "
                          f"(or {ENVIRONMENT[missing[0]]})")
    count, index = int(given["num_processes"]), int(given["process_id"])
    if not 0 <= index < count:
        raise ConfigError(f"distributed: process id {index} is not in 0..{count - 1}")
    jax.distributed.initialize(coordinator_address=given["coordinator"], num_processes=count, process_id=index,
                               initialization_timeout=timeout_seconds)

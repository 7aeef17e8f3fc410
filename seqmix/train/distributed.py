"""Joining a multi-process run through JAX's own distributed runtime (`jax.distributed`).

Each process of a run is launched with the same command plus its place in the run: the
coordinator's address (host:port of process 0), the number of processes and its own id, as
arguments or as the environment variables SEQMIX_COORDINATOR, SEQMIX_NUM_PROCESSES and
SEQMIX_PROCESS_ID. From there on the run is one SPMD program over every process's devices:
each process loads its rows of every batch, and all of them write the checkpoints together.

Before `jax.distributed.initialize`, the processes answer a roll call on the coordinator's port:
JAX's own start-up wait ends in a fatal abort that names neither the missing process nor the
coordinator, while the roll call names both and exits cleanly (exit code 2 through the CLI). Two
timeouts are options: the start-up wait (SEQMIX_STARTUP_TIMEOUT) and the heartbeat after which
JAX's runtime declares a silent process dead (SEQMIX_HEARTBEAT_TIMEOUT).
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np

from seqmix.configuration import ConfigError, first_difference

ENVIRONMENT = {"coordinator": "SEQMIX_COORDINATOR", "num_processes": "SEQMIX_NUM_PROCESSES",
               "process_id": "SEQMIX_PROCESS_ID", "startup_timeout": "SEQMIX_STARTUP_TIMEOUT",
               "heartbeat_timeout": "SEQMIX_HEARTBEAT_TIMEOUT"}
DEFAULT_STARTUP_TIMEOUT = 300  # seconds for every process to start (JAX's default): hosts of a cluster start unevenly
DEFAULT_HEARTBEAT_TIMEOUT = 100  # seconds of silence before a process counts as dead (JAX's default)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, startup_timeout: float | None = None, heartbeat_timeout: int | None = None) -> None:
    """Starts `jax.distributed` when this process is one of several (`num_processes` > 1); does
    nothing for a single process. Must run before anything touches a device. Arguments left
    None come from the environment, then the defaults; a partial set is an error that names what
    is missing, and a process that does not join within `startup_timeout` seconds is an error
    that names it and the coordinator, raised on every process that did start."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "startup_timeout": startup_timeout, "heartbeat_timeout": heartbeat_timeout}
    for name, value in given.items():
        if value is None and ENVIRONMENT[name] in os.environ:
            given[name] = os.environ[ENVIRONMENT[name]]
    if given["num_processes"] is None or int(given["num_processes"]) == 1:
        return
    missing = [name for name in ("coordinator", "process_id") if given[name] is None]
    if missing:
        raise ConfigError(f"distributed: {given['num_processes']} processes need --{missing[0].replace('_', '-')} "
                          f"(or {ENVIRONMENT[missing[0]]})")
    count, index = int(given["num_processes"]), int(given["process_id"])
    if not 0 <= index < count:
        raise ConfigError(f"distributed: process id {index} is not in 0..{count - 1}")
    startup = _positive(given, "startup_timeout", DEFAULT_STARTUP_TIMEOUT)
    heartbeat = _positive(given, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)
    _roll_call(given["coordinator"], count, index, startup)
    # The roll call has just seen every process, so JAX's own wait is short; it keeps the full
    # timeout only for a process that dies in between.
    jax.distributed.initialize(coordinator_address=given["coordinator"], num_processes=count, process_id=index,
                               initialization_timeout=max(1, round(startup)),
                               heartbeat_timeout_seconds=max(1, round(heartbeat)))


def _positive(given: dict, name: str, default: float) -> float:
    """The timeout `name` in seconds (its default when not given), or a ConfigError naming the option."""
    value = given[name]
    try:
        seconds = default if value is None else float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"distributed: --{name.replace('_', '-')} (or {ENVIRONMENT[name]}) must be a positive "
                          f"number of seconds, got {value!r}")
    return seconds


def _roll_call(coordinator: str, count: int, index: int, timeout: float) -> None:
    """Process 0 listens on the coordinator's port until every other process has said its id and
    the process count, then tells each of them to go on (or which processes are missing); the
    others call in, retrying until the timeout. The port is free again when this returns, for
    JAX's coordination service."""
    host, _, port_text = coordinator.rpartition(":")
    host = host.strip("[]")  # an IPv6 address is written [::1]:1234
    if not host or not port_text.isdigit():
        raise ConfigError(f"distributed: --coordinator {coordinator!r} is not HOST:PORT")
    port, deadline = int(port_text), time.monotonic() + timeout
    if index == 0:
        _call_the_roll(port, count, coordinator, deadline, timeout)
    else:
        _answer_the_roll(host, port, count, index, coordinator, deadline, timeout)


def _call_the_roll(port: int, count: int, coordinator: str, deadline: float, timeout: float) -> None:
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    except OSError as err:
        raise ConfigError(f"distributed: process 0 cannot listen on port {port} of the coordinator "
                          f"{coordinator}: {err.strerror}; choose another port") from None
    joined: dict[int, socket.socket] = {}
    refusal = None
    try:
        while len(joined) < count - 1 and refusal is None and (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                peer, _ = server.accept()
            except TimeoutError:
                break
            peer.settimeout(10)
            try:
                words = peer.makefile().readline(100).split()
            except OSError:
                words = []
            if len(words) != 3 or words[0] != "seqmix" or not all(w.isdigit() for w in words[1:]):
                peer.close()  # not one of ours (a port scanner, a stray client): ignore it
                continue
            their_index, their_count = int(words[1]), int(words[2])
            problem = ("another --num-processes" if their_count != count else
                       "an id out of range" if not 0 < their_index < count else
                       "an id that another process already has" if their_index in joined else None)
            if problem:
                refusal = (f"a process said it is process {their_index} of {their_count}: {problem} (this run has "
                           f"{count} processes)")
                joined[-1] = peer  # answered below, with the others
            else:
                joined[their_index] = peer
        absent = [i for i in range(1, count) if i not in joined]
        for peer in joined.values():
            answer = f"refused: {refusal}" if refusal else "missing " + ",".join(map(str, absent)) if absent else "go"
            _send(peer, answer)
    finally:
        for peer in joined.values():
            peer.close()
        server.close()
    if refusal:
        raise ConfigError(f"distributed: the coordinator {coordinator} refused the run: {refusal}")
    if absent:
        raise ConfigError(f"distributed: process(es) {_ids(absent)} of {count} did not join the run at the "
                          f"coordinator {coordinator} within {timeout:g} s; start them (--process-id), or "
                          "give them longer with --startup-timeout")


def _answer_the_roll(host: str, port: int, count: int, index: int, coordinator: str, deadline: float,
                     timeout: float) -> None:
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"distributed: process {index} found no coordinator at {coordinator} (process 0) "
                                  f"within {timeout:g} s; start process 0 there, check the address, or give it "
                                  "longer with --startup-timeout") from None
            time.sleep(0.2)
    with sock:
        sock.sendall(f"seqmix {index} {count}\n".encode())
        sock.settimeout(timeout + 10)  # process 0 waits up to its own timeout for the others
        try:
            answer = sock.makefile().readline(1000).strip()
        except OSError:
            answer = ""
    if answer.startswith("missing "):
        absent = [int(i) for i in answer.split()[1].split(",")]
        raise ConfigError(f"distributed: process(es) {_ids(absent)} of {count} did not join the run at the "
                          f"coordinator {coordinator} in time; start them (--process-id), or give them longer "
                          "with --startup-timeout")
    if answer.startswith("refused: "):
        raise ConfigError(f"distributed: the coordinator {coordinator} refused the run: {answer[len('refused: '):]}")
    if answer != "go":
        raise ConfigError(f"distributed: the coordinator {coordinator} (process 0) left without an answer "
                          f"(this is process {index} of {count}); see process 0's output")


def _send(peer: socket.socket, line: str) -> None:
    try:
        peer.sendall(f"{line}\n".encode())
    except OSError:
        pass  # that process is gone; it reports its own failure


def _ids(indices: list[int]) -> str:
    return ", ".join(map(str, indices))


def check_same_config(config: dict) -> None:
    """Of several processes, refuses (ConfigError, on every process) a resolved config that is not
    the same in all of them, naming the first differing dotted key and the two values: processes
    started with another `steps`, learning rate or seed would otherwise train inconsistent
    replicas, or wait forever in a collective the others never reach. One process: nothing to do."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(config, default=str).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(encoded)] = encoded
    gathered = multihost_utils.process_allgather(padded)
    configs = [json.loads(bytes(row[:length])) for row, length in zip(gathered, lengths)]
    for index, other in enumerate(configs[1:], start=1):
        found = first_difference(configs[0], other)
        if found:
            key, first, then = found
            raise ConfigError(f"{key}: process 0 has {first!r}, process {index} has {then!r}; every process of a run "
                              "needs the same config and overrides")

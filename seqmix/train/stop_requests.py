"""Stop requests (SIGTERM, SIGINT) that a training loop honours between steps, in one process or many.

The first request sets a flag that the loop polls once per step; the loop then saves a checkpoint
and returns. Of several processes, the flag is gathered from all of them at every poll, so that a
request reaching any one process (a scheduler's SIGTERM to one host, a Ctrl-C in one terminal)
stops every process after the same step: they then write one checkpoint together instead of one
of them waiting forever in a collective that the others have left. A second request exits the
process at once, without a checkpoint, even while the main thread is blocked inside XLA.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager: SIGTERM/SIGINT -> `signal` (the first request's number); `poll()` once per
    step gives the request that all processes agree on."""

    def __init__(self):
        self.signal: int | None = None  # the first request to this process
        self._previous_handlers = {}
        self._previous_wakeup = -1
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach Python's main thread only: a loop run elsewhere is not stopped by them
        # Python runs signal handlers in the main thread between bytecodes, which never happens
        # while that thread waits inside XLA (a step, or a collective a peer has left). The C-level
        # handler writes each signal's number to the wakeup socket at once, so a watcher thread sees
        # every request in time, the second one included.
        read_end, write_end = socket.socketpair()
        write_end.setblocking(False)
        self._wakeup = (read_end, write_end)
        self._previous_wakeup = signal.set_wakeup_fd(write_end.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, _noted_by_watcher)
        self._watcher = threading.Thread(target=self._watch, name="seqmix-stop-requests", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        read_end = self._wakeup[0]
        while data := read_end.recv(64):  # b"" once __exit__ closes the other end
            for signum in data:
                if signum not in SIGNALS:
                    continue  # the wakeup socket hears every signal that has a Python handler
                if self.signal is None:
                    self.signal = signum
                    print(f"\nseqmix: {signal.Signals(signum).name} received: stopping after this step and saving a "
                          "checkpoint (send it again to exit at once, without one)", file=sys.stderr, flush=True)
                else:
                    print(f"seqmix: second stop request ({signal.Signals(signum).name}): exiting now without a "
                          "checkpoint; resume from the last saved one", file=sys.stderr, flush=True)
                    os._exit(128 + signum)  # neither the loop nor a stuck collective may delay this exit

    def poll(self) -> int | None:
        """The signal that stops the run after the current step, or None. With several processes,
        every process must call this at the same point of every step: it is one small all-gather,
        and every process gets the same answer (the lowest-numbered process's request wins)."""
        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        requests = multihost_utils.process_allgather(np.int32(self.signal or 0))
        asked = [index for index, signum in enumerate(requests) if signum]
        if not asked:
            return None
        signum = int(requests[asked[0]])
        if self.signal is None:
            print(f"\nseqmix: process {asked[0]} received {signal.Signals(signum).name}: every process stops after "
                  "this step and saves the checkpoint", file=sys.stderr, flush=True)
        return signum

    def __exit__(self, *exc):
        if self._wakeup is None:
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        read_end, write_end = self._wakeup
        write_end.close()
        self._watcher.join()
        read_end.close()


def _noted_by_watcher(_signum, _frame) -> None:
    """The Python-level handler: a no-op, installed so that the signal neither kills the process
    nor raises KeyboardInterrupt; the watcher thread has already seen it through the wakeup socket."""

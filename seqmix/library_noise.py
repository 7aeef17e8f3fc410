"""Keeping the libraries' own reports of a failure out of the user's terminal.

When a checkpoint cannot be written, orbax, asyncio and absl each report it again from their
background threads and event loops: hundreds of lines of tracebacks and ERROR logs around the
one line in which seqmix names the step, the directory and the cause. The command line filters
them unless `--verbose` is given: the loggers of those libraries report only CRITICAL, and a
traceback printed for an exception raised and caught nowhere in seqmix's own code (an orbax
thread, an orphaned asyncio task, a closed event loop's callback) is dropped. A traceback through
seqmix's code is always printed. The garbage collector's warning "coroutine '...' was never
awaited", for an orbax coroutine whose event loop closed before it ran, is dropped too (it may come
at any point up to the interpreter's exit, after seqmix's own line); seqmix defines no coroutine, so
every such warning is a library's.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
import warnings
from pathlib import Path

NOISY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")
_LIBRARIES = ("orbax", "asyncio", "tensorstore", "concurrent")
_OWN = str(Path(__file__).parent)


def _library_noise(error: BaseException | None) -> bool:
    """Whether `error`'s traceback runs through the noisy libraries and nowhere through seqmix."""
    if error is None or error.__traceback__ is None:
        return False
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    return (not any(name.startswith(_OWN) for name in files)
            and any(f"{library}{sep}" in name for name in files for library in _LIBRARIES for sep in ("/", "\\")))


def keep_library_noise_out() -> None:
    """Installs the filters described above, for the rest of the process."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    print_uncaught, print_thread_error, print_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

    def uncaught(kind, error, trace):
        if not _library_noise(error):
            print_uncaught(kind, error, trace)

    def thread_error(report):
        if not _library_noise(report.exc_value):
            print_thread_error(report)

    def unraisable(report):
        if not _library_noise(report.exc_value):
            print_unraisable(report)

    sys.excepthook, threading.excepthook, sys.unraisablehook = uncaught, thread_error, unraisable

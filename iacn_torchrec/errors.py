"""The base of the errors a user can fix (bad input, config, files): ``iacn`` prints their message,
naming the file/line/field, without a traceback."""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["UserError", "TrainingInterrupted", "report_error"]


class UserError(Exception):
    """Bad input, configuration or files (not a bug): the CLI reports it in one line, exit status 2."""


class TrainingInterrupted(KeyboardInterrupt):
    """A one-process run stopped by Ctrl-C or SIGTERM after its step in progress, checkpointed. A
    ``KeyboardInterrupt`` (callers that catch ``Exception`` do not swallow it); ``signum`` is the
    signal's number (the CLI exits with 128 + signum, as a signalled process would)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def report_error(message: str) -> None:
    """Print ``message`` (one line, no traceback) on stderr and, under torchrun / TorchX
    (``TORCHELASTIC_ERROR_FILE`` set by the elastic agent for each worker), write it as this worker's
    error, so that the launcher's failure summary names the cause (``iacn train: DIR: no such
    prepared dataset directory ...``) instead of ``<N/A>`` and a pointer to the docs. Same format as
    torchelastic's ``@record``, with the line in place of a traceback: these are errors the user
    fixes (or a signal's stop), not bugs. The file is skipped outside such a launch, or if it cannot
    be written (the message was printed anyway)."""
    print(message, file=sys.stderr)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass

"""What a client is told when a job fails, and what only the log keeps.

A job's ``error`` is shown to whoever can read the job, so it never carries raw exception
text from inside the server (file paths, library internals): bad input found by a pipe keeps
its message (it names the parameter and the allowed values) with absolute paths reduced to
file names; anything else becomes a short message that names the error's kind and where the
details are (the server log, under the job's id), where the traceback is logged in full.
"""
from __future__ import annotations

import errno
import re
from typing import Any

#: absolute POSIX or Windows paths inside a message (up to the next space, quote or bracket)
_PATH = re.compile(r"(?<![\w.])(?:/[^\s'\"<>()\[\]{}:,]+)+|[A-Za-z]:\\[^\s'\"<>()\[\]{}]+")

#: exception types whose cause a user can act on, with what to say (the type's name is matched,
#: so no heavy import is needed to recognise torch's)
_KNOWN = {
    "OutOfMemoryError": "the device ran out of memory: try a smaller size, fewer images at once "
                        "or another model",
}


#: OSError numbers of a disk the server cannot write, with what to say (an admin must act; the job can be
#: queued again after)
_DISK = {
    errno.ENOSPC: "the server's disk is full while writing an image: ask the admin to free space, then queue "
                  "the job again",
    errno.EDQUOT: "the server's disk quota is used up while writing an image: ask the admin to free space, then "
                  "queue the job again",
    errno.EROFS: "the server's output or data folder is read-only: ask the admin to make it writable, then queue "
                 "the job again",
    errno.EACCES: "the server may not write its output or data folder: ask the admin to fix its permissions, "
                  "then queue the job again",
}


def storage_error(exc: BaseException) -> str | None:
    """What to say for a disk that is full or read-only, or a job store that is locked or read-only."""
    if isinstance(exc, OSError) and exc.errno in _DISK:
        return _DISK[exc.errno]
    text = str(exc).lower()
    if type(exc).__name__ == "OperationalError" and ("locked" in text or "readonly" in text or "read-only" in text):
        return ("the job store is locked or read-only (another process holds it, or its folder is not writable): "
                "ask the admin to check the data folder, then queue the job again")
    return None


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path reduced to its last part (``/srv/models/x.safetensors`` -> ``x.safetensors``)."""
    return _PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or m.group(0), text)


def job_error(exc: BaseException, job_id: str, *, bad_input: bool, field: str | None = None) -> dict[str, Any]:
    """The ``error`` of a failed job as clients see it.

    Args:
        exc: what ended the job.
        job_id: named in the message so an admin can find the logged traceback.
        bad_input: the pipe refused the job's input (its message is meant for the user).
        field: the parameter a bad input names.
    """
    kind = type(exc).__name__
    if bad_input:
        error: dict[str, Any] = {"type": kind, "message": scrub_paths(str(exc))[:1000]}
        if field:
            error["field"] = field
        return error
    what = _KNOWN.get(kind) or storage_error(exc) or "the job failed on the server"
    return {"type": kind, "message": f"{what} ({kind}); the server log has the details under job {job_id}"}

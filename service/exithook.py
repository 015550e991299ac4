"""Running a hook when the main thread ends, before the interpreter starts shutting down."""
from __future__ import annotations

import atexit
import threading
import weakref
from typing import Callable


def register_exit_hook(hook: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``hook`` when the main thread ends, before the interpreter starts shutting down.

    ``threading._register_atexit`` hooks run before concurrent.futures refuses new work
    (which torch and transformers use while loading); plain ``atexit`` runs too late for a
    job to load a model. The hook is a no-op once the service was stopped.
    """
    # the hooks cannot be unregistered: hold the service weakly, so a stopped one can be freed
    ref = weakref.WeakMethod(hook)  # type: ignore[arg-type]

    def run() -> None:
        bound = ref()
        if bound is not None:
            bound()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(run)
            return None
    except RuntimeError:  # interpreter already shutting down
        return None
    atexit.register(run)  # pragma: no cover - Python without the private hook
    return run  # pragma: no cover


def unregister_exit_hook(hook: Callable[[], None] | None) -> None:
    """Undo :func:`register_exit_hook` where it could be undone (a plain ``atexit`` hook)."""
    if hook is not None:
        atexit.unregister(hook)

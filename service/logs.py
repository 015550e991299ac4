"""Logging set-up: a daily file in the logging folder and the console."""
from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ensure_logging(folder: Path) -> None:
    """:func:`setup_logging` unless the ``multigen`` loggers already have their handlers (once per process)."""
    if not any(getattr(h, "_multigen", False) for h in logging.getLogger("multigen").handlers):
        setup_logging(folder)


def setup_logging(folder: Path, level: int = logging.INFO, console: bool = True) -> Path:
    """Send the ``multigen`` loggers to ``folder/multigen.log`` (rotated daily) and the console.

    Returns:
        the log file path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multigen.log"
    root = logging.getLogger("multigen")
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_multigen", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [
        logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=30, encoding="utf-8")]
    if console:
        handlers.append(logging.StreamHandler())
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        h._multigen = True  # type: ignore[attr-defined]
        root.addHandler(h)
    # diffusers/transformers chatter (progress bars, LoRA load reports) is not ours to print
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    return path

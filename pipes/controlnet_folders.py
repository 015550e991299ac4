"""metafusion's default ControlNet folders, for ControlNet pipes given no ``controlnets``.

metafusion loads the ControlNet of each condition type from a fixed folder relative to the
working directory: ``./models-cn/<name>`` for SD and ``./models-cn-xl/<name>`` for SDXL, with
one folder name per condition type (e.g. ``soft`` -> ``control_v11p_sd15_softedge``). The
folder and the names are each family's ``controlnet_folder`` and ``controlnet_models``
(see ``families``). ``MULTIGEN_CONTROLNET_ROOT`` names another folder to look in instead of
the working directory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import MissingConditionModelError
from .families import FAMILIES, Family

logger = logging.getLogger(__name__)

#: the folder that holds ``models-cn/`` and ``models-cn-xl/`` (default: the working directory)
ROOT_ENV = "MULTIGEN_CONTROLNET_ROOT"


def controlnet_root() -> Path:
    """Where the default ControlNet folders are: ``$MULTIGEN_CONTROLNET_ROOT``, else the working directory."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else Path.cwd()


def default_controlnet_path(fam: Family, ctype: str, owner: str = "ControlNet pipe") -> Path:
    """The ControlNet folder of ``ctype`` for models of family ``fam``, as metafusion lays them out.

    Args:
        fam: the base model's family.
        ctype: the condition type.
        owner: the pipe class name, for the error message.

    Returns:
        An existing diffusers ControlNet folder (with a ``config.json``).

    Raises:
        MissingConditionModelError: the family has no default ControlNet folders (Flux), none for
            ``ctype``, or its folder is missing; the message names the folder looked for and how to
            configure one.
    """
    root = controlnet_root()
    how = (f"pass controlnets={{{ctype!r}: <ControlNet folder>}} (or a list in the order of ctypes), or, in the "
           f"service, list the ControlNet under `controlnet:` in models.yaml and name it in the pipe entry "
           f"(`controlnet: {{{ctype}: <name>}}`)")
    if not fam.controlnet_folder or not fam.controlnet_models:
        having = ", ".join(f"{f.name} (./{f.controlnet_folder}/)" for f in FAMILIES if f.controlnet_models)
        raise MissingConditionModelError(
            f"{owner} has no ControlNet for ctypes {ctype!r}: {fam.name} models have no default ControlNet "
            f"folders (metafusion has them for {having}); {how}", "controlnets",
            "controlnets= or models.yaml controlnet:")
    name = fam.controlnet_models.get(ctype)
    if name is None:
        known = ", ".join(sorted(fam.controlnet_models))
        raise MissingConditionModelError(
            f"{owner} has no ControlNet for ctypes {ctype!r} ({fam.name}): metafusion's default folder "
            f"{fam.controlnet_folder}/ names none for it (it has {known}); {how}", "controlnets",
            "controlnets= or models.yaml controlnet:")
    path = root / fam.controlnet_folder / name
    if not (path / "config.json").is_file():
        where = f"${ROOT_ENV}" if os.environ.get(ROOT_ENV) else "the working directory"
        raise MissingConditionModelError(
            f"{owner} found no ControlNet for ctypes {ctype!r} ({fam.name}): looked for the diffusers folder "
            f"{path} (metafusion's ./{fam.controlnet_folder}/{name}, relative to {where}; set {ROOT_ENV} to "
            f"look elsewhere); {how}", "controlnets", f"a ControlNet folder at {path}, controlnets= or "
                                                       f"models.yaml controlnet:")
    logger.info("using the default %s ControlNet %s for %s", fam.name, path, ctype)
    return path

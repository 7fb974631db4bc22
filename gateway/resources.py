"""Where Herald's data files are: the mappings and the sample messages.

Both folders sit at the top of the repository (``mappings/``,
``sample_messages/``) and are installed as the packages ``gateway.mappings``
and ``gateway.sample_messages`` (``setup.cfg``: ``package_dir`` and
``package_data``), so an editable install and a wheel find them the same way,
through :mod:`importlib.resources`, and nothing else in Herald computes a path
from ``__file__``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["mappings_dir", "samples_dir"]


@cache
def mappings_dir() -> Path:
    """The folder of mapping data: code tables, the matching model, roster formats."""
    return _folder("gateway.mappings")


@cache
def samples_dir() -> Path:
    """The folder of synthetic sample messages and the sample roster (``herald demo`` replays them)."""
    return _folder("gateway.sample_messages")


def _folder(package: str) -> Path:
    # Installed unzipped (pip always does), so the traversable is a real folder.
    return Path(str(resources.files(package)))

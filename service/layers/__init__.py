"""Layer kinds, one module each, and :func:`build_layer` that makes one from its config.

=========  ===========================================================================
``ram``    :class:`~tierdisk.service.layers.ram.RamLayer`: in memory, lost at exit
``raw``    :class:`~tierdisk.service.layers.raw.RawLayer`: a plain image file
``sparse`` :class:`~tierdisk.service.layers.sparse.SparseLayer`: sparse file + presence log
``sqlite`` :class:`~tierdisk.service.layers.sqlite.SqliteLayer`: one SQLite file
``remote`` :class:`~tierdisk.service.layers.remote.RemoteLayer`: another tierdisk's volume
=========  ===========================================================================
"""

from __future__ import annotations

import importlib

from ..config import LayerConfig
from ..layer import Layer

__all__ = ["KIND_CLASSES", "build_layer"]

KIND_CLASSES: dict[str, str] = {
    "ram": "ram:RamLayer",
    "raw": "raw:RawLayer",
    "sparse": "sparse:SparseLayer",
    "sqlite": "sqlite:SqliteLayer",
    "remote": "remote:RemoteLayer",
}
"""Config ``kind`` → ``module:Class`` in this package (imported on first use, so a server
without remote layers never imports the gRPC client)."""


def build_layer(config: LayerConfig) -> Layer:
    """A new, unattached layer for ``config`` (its options are the class's keyword args)."""
    module_name, class_name = KIND_CLASSES[config.kind].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: type[Layer] = getattr(module, class_name)
    return cls(**config.options)

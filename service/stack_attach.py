"""Attaching a volume's layers: bottom-up, under the construction rules (DESIGN.md §3).

:func:`attach_stack` is the first half of :meth:`tierdisk.service.volume.Volume.open`: it
attaches each layer to the one below it, bottom first, and applies the rules of
:mod:`.stack_rules` as soon as what they read is known, the rules that need no attached
layer before any layer creates a file or waits for a remote tier. Entries are indexed as in
the volume, 0 the top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import ConfigError, DeadlineExceeded, TierdiskError, Unavailable
from .layer import Layer, LayerMetadata
from .stack_rules import (
    check_read_cache,
    check_same_sector_size,
    check_write_path,
    check_write_through,
)

if TYPE_CHECKING:
    from .volume import LayerEntry

__all__ = ["attach_stack"]


async def attach_stack(name: str, entries: Sequence[LayerEntry], read_only: bool) -> None:
    """Attach the layers of ``entries`` (top first) bottom-up for the volume ``name`` and
    enforce the construction rules; ``read_only``: the volume takes no writes.

    Raises :class:`ConfigError` naming the volume, the layer index and the rule (a layer's
    own refusal too: its ``ValueError``, ``OSError`` or domain error), after closing the
    layers already attached; a remote tier that is not up yet (:class:`Unavailable`,
    :class:`DeadlineExceeded`) is raised as it is, for the caller to retry later.
    """
    if not entries:
        raise ConfigError("a volume needs at least one layer", volume=name)
    # The rules that need no attached layer come first, so a broken stack is refused
    # before any layer creates a file or waits for a remote tier.
    check_write_through(name, entries)
    for i, entry in enumerate(entries):
        check_read_cache(name, i, entry)
    attached: list[Layer] = []
    try:
        lower: LayerMetadata | None = None
        bottom_sector_size = 0
        for i in reversed(range(len(entries))):
            entry = entries[i]
            try:
                await entry.layer.attach(lower)
            except ConfigError as exc:
                raise exc.located(volume=name, layer=i) from None
            except (Unavailable, DeadlineExceeded):
                raise  # a tier that is not up yet: the caller may retry later
            except (ValueError, OSError, TierdiskError) as exc:
                raise ConfigError(str(exc), volume=name, layer=i) from None
            attached.append(entry.layer)
            meta = entry.layer.metadata()
            check_read_cache(name, i, entry)  # again: a remote may turn out read-only
            bottom_sector_size = bottom_sector_size or meta.sector_size
            check_same_sector_size(name, i, meta.sector_size, bottom_sector_size)
            lower = meta
        check_write_path(name, entries, read_only)
    except BaseException:
        for layer in attached:
            with contextlib.suppress(Exception):
                await layer.close()
        raise

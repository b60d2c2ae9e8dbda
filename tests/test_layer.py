"""``layer``: what the base classes ask of a layer kind."""

from __future__ import annotations

from typing import Any

import pytest

from tierdisk.service.layer import LayerMetadata, PartialLayer
from tierdisk.service.runs import Run


class _Forgetful(PartialLayer):
    """A partial layer kind with the base operations but neither cache fill nor count."""

    kind = "forgetful"

    async def attach(self, lower: LayerMetadata | None) -> None: ...

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        return []

    async def write(self, data: memoryview, sector: int, fua: bool) -> None: ...

    async def unmap(self, *args: Any) -> None: ...

    async def flush(self) -> None: ...


def test_a_partial_layer_kind_must_fill_a_cache_and_count_what_it_holds() -> None:
    """A kind that says it can be a read cache (every :class:`PartialLayer` does) but does
    not implement the fill, or does not count its sectors, cannot be made at all: otherwise
    it would pass the read-cache rule at start and fail its first fill, and report itself
    full (the base class's count)."""
    with pytest.raises(TypeError, match=r"present_sectors.*write_no_overwrite"):
        _Forgetful()  # type: ignore[abstract]

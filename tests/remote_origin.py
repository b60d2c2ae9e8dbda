"""A ``remote`` layer for engine-level stacks (tests/stacks.py): it brings its own origin.

:class:`ServedRemoteLayer` starts, at attach, an in-process tierdisk server on 127.0.0.1
port 0 that serves one ``ram`` volume of the layer's size and sector size, connects to it
like any remote layer, and stops that server at close. So a stack spec such as
``"ram/remote"`` is a complete, self-cleaning stack: closing the volume closes the layer,
which stops its origin. :meth:`ServedRemoteLayer.nbd_builder` makes the same layer in
``mode = "disk"`` reading over the origin's NBD export (the ``nbd`` option), so every
conformance scenario also runs with reads on NBD and everything else on gRPC.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tierdisk.service.config import Config, LayerConfig, ServerConfig, VolumeConfig
from tierdisk.service.layer import Layer, LayerMetadata
from tierdisk.service.layers.remote import RemoteLayer
from tierdisk.service.server import Server

__all__ = ["ServedRemoteLayer"]


class ServedRemoteLayer(RemoteLayer):
    """A remote layer (``mode``, default ``"layer"``) over its own in-process origin server."""

    def __init__(
        self,
        folder: Path,
        sector_size: int,
        size: int | None,
        *,
        mode: str = "layer",
        nbd: bool = False,
    ) -> None:
        # target: at attach; with nbd, reads over the origin's export, which it tells ("auto")
        super().__init__("127.0.0.1:0", "origin", mode=mode, timeout=10, nbd="auto" if nbd else "")
        self._with_nbd = nbd
        self._folder = folder
        self._wanted = (sector_size, size)
        self.origin: Server | None = None

    @classmethod
    def builder(cls, folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
        """A :data:`stacks.LAYER_KINDS` builder."""
        return cls(folder / f"origin{index}", sector_size, size)

    @classmethod
    def nbd_builder(cls, folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
        """A :data:`stacks.LAYER_KINDS` builder: disk mode, reads over the origin's NBD."""
        return cls(folder / f"origin{index}", sector_size, size, mode="disk", nbd=True)

    async def attach(self, lower: LayerMetadata | None) -> None:
        sector_size, size = self._wanted
        if size is None and lower is not None:
            size = lower.sector_count * lower.sector_size
        if size is None:
            raise ValueError("a served remote layer needs a size or a layer below")
        ram = LayerConfig("ram", options={"size": size, "sector_size": sector_size})
        server = Server(
            Config(
                ServerConfig(
                    listen="127.0.0.1:0",
                    metrics="",
                    data_dir=str(self._folder),
                    nbd="127.0.0.1:0" if self._with_nbd else "",
                ),
                (VolumeConfig("origin", (ram,)),),
            )
        )
        # In a task of its own (as Server.start also does inside): the server id it records
        # must not become the id of the test's own calls, or the origin sees a loop.
        await asyncio.create_task(server.start())
        self.origin = server
        self.target = server.grpc_address
        self.nbd_address = server.nbd_address
        try:
            await super().attach(lower)
        except BaseException:
            await self._stop_origin()
            raise

    async def close(self) -> None:
        await super().close()
        await self._stop_origin()

    async def _stop_origin(self) -> None:
        if self.origin is not None:
            origin, self.origin = self.origin, None
            await origin.stop(grace=1)

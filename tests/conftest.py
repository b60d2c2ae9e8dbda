"""Shared fixtures of the engine tests, and of the tests of the ``tierdisk`` command.

- ``volumes``: opens volumes (from layer entries or a stack spec) and closes every one of
  them when the test ends, pass or fail.
- ``volume``: one fresh volume per stack of :data:`stacks.STACKS` (parametrised), for the
  conformance suite.
- ``server``: a ``tierdisk serve`` child process serving :data:`cli_runs.VOLUMES`, one per
  test module, for the tests that run the ``tierdisk`` command against it.
- ``exp_data``: the bytes written onto every sector of that server's 8 MiB volume ``exp``.

Data helpers (:func:`stacks.pattern`, :func:`stacks.sector_pattern`) and the
:class:`stacks.MapLayer` double live in tests/stacks.py; the helpers that run the
``tierdisk`` command in tests/cli_runs.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_runs import VOLUMES, MiB, tierdisk
from servers import ServerProcess, write_config
from stacks import STACKS, NamedStack, build_stack

from tierdisk.service.layer import Layer
from tierdisk.service.volume import LayerEntry, Volume


class VolumeOpener:
    """Opens volumes for one test and closes them all at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.opened: list[Volume] = []

    async def __call__(
        self,
        *layers: Layer | LayerEntry,
        read_only: bool = False,
        name: str = "vol",
    ) -> Volume:
        """Open a volume of ``layers`` (top first); a bare layer gets no flags."""
        entries = [x if isinstance(x, LayerEntry) else LayerEntry(x) for x in layers]
        volume = await Volume.open(name, entries, read_only=read_only)
        self.opened.append(volume)
        return volume

    async def spec(self, spec: str, **kwargs: Any) -> Volume:
        """Open the stack ``spec`` (see :func:`stacks.build_stack`) in the test's folder."""
        volume = await build_stack(spec, self.folder, **kwargs)
        self.opened.append(volume)
        return volume

    async def close_all(self) -> None:
        for volume in reversed(self.opened):
            await volume.close()
        self.opened.clear()


@pytest.fixture
async def volumes(tmp_path: Path) -> AsyncIterator[VolumeOpener]:
    opener = VolumeOpener(tmp_path)
    try:
        yield opener
    finally:
        await opener.close_all()


@pytest.fixture(params=STACKS, ids=[s.name for s in STACKS])
async def volume(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Volume]:
    stack: NamedStack = request.param
    vol = await stack.factory(tmp_path)
    try:
        yield vol
    finally:
        await vol.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("cli-server")
    with ServerProcess.start(tmp, write_config(tmp, VOLUMES)) as srv:
        yield srv


@pytest.fixture(scope="module")
def exp_data(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The 8 MiB volume `exp`, every sector written (allocated)."""
    data = os.urandom(8 * MiB)
    src = tmp_path_factory.mktemp("exp") / "exp.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "exp", "0", "-i", str(src))
    return data

"""A minimal raw NBD client for tests (asyncio streams), and the protocol's numbers from the
NBD spec, written independently of the server's own module."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT = 6, 7, 8, 9
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_TLS_REQD = (1 << 31) + 2, (1 << 31) + 3, (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
CMD_READ, CMD_WRITE = 0, 1


def go_data(export: str) -> bytes:
    """The data of ``NBD_OPT_GO`` (or ``NBD_OPT_INFO``) for an export, asking no information."""
    name = export.encode()
    return struct.pack(">I", len(name)) + name + b"\0\0"


class Raw:
    """A minimal NBD client over asyncio streams: options one at a time, then TLS with
    :meth:`starttls`, then simple-reply requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.handle = 0

    @classmethod
    async def open(cls, address: str, flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> Raw:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        magic, ihaveopt, _ = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        writer.write(struct.pack(">I", flags))
        return cls(reader, writer)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; every reply up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            header = await asyncio.wait_for(self.reader.readexactly(20), 10)
            magic, got, reply, length = struct.unpack(">QIII", header)
            assert (magic, got) == (OPT_REPLY_MAGIC, option)
            replies.append((reply, await self.reader.readexactly(length)))
            if reply == REP_ACK or reply & 1 << 31:
                return replies

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert await self.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname="127.0.0.1"), 10)

    async def go(self, export: str) -> None:
        replies = await self.option(OPT_GO, go_data(export))
        assert replies[-1][0] == REP_ACK, replies

    async def request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self.handle += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, length)
        self.writer.write(header + data)
        magic, error, handle = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert (magic, error, handle) == (SIMPLE_MAGIC, 0, self.handle)
        return await self.reader.readexactly(length) if cmd == CMD_READ else b""

    async def error(self, cmd: int, offset: int, length: int, data: bytes = b"") -> int:
        """Send one request; the error value of its reply (its data read when it has some)."""
        self.handle += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, length)
        self.writer.write(header + data)
        magic, error, handle = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert (magic, handle) == (SIMPLE_MAGIC, self.handle)
        if cmd == CMD_READ and error == 0:
            await self.reader.readexactly(length)
        return int(error)

    async def closed(self) -> bool:
        """True when the server ends the connection (within 10 s) without sending more."""
        try:
            return await asyncio.wait_for(self.reader.read(1), 10) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)

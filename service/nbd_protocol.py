"""NBD wire format: constants, message packing and option parsing (fixed newstyle).

Values and layouts follow the NBD protocol document (``doc/proto.md`` of
NetworkBlockDevice/nbd): the handshake and option haggling, simple and structured replies,
block status and metadata contexts. Everything is big-endian. No I/O here: :mod:`.nbd`
drives the sessions.

The modules of the export (and :mod:`.nbd_client`) use it as a namespace, ``from . import
nbd_protocol as P``; every name without a leading underscore is part of it, constants named
as the protocol document names them (``NBD_OPT_GO`` is ``OPT_GO``). Its ``__all__`` is built
from those names at the end of the module rather than written out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_IMPORTED = frozenset(globals())  # what the module imports: not its own names

# -- handshake ------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5  # the server requires TLS: NBD_OPT_STARTTLS first
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags (16 bits, sent with the export size)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ---------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Command flags each command accepts (FUA is valid on every command).
CMD_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXTS = (CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH)
CONTEXT_IDS = {CONTEXT_BASE_ALLOCATION: 1, CONTEXT_ALLOCATION_DEPTH: 2}

# NBD error values (the protocol fixes them; they happen to equal Linux errno values).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {
    0: "ok",
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

MAX_STRING = 4096  # longest string (names, messages) the protocol allows

# -- structs --------------------------------------------------------------------------------

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REQUEST_SIZE = REQUEST.size  # 28
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset of OFFSET_DATA
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset, size of OFFSET_HOLE
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def server_greeting() -> bytes:
    """NBDMAGIC, IHAVEOPT and the handshake flags the server offers."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: int, message: str) -> bytes:
    """An option error reply carrying a message for a person."""
    return option_reply(option, reply, clip_string(message))


def rep_server(name: str) -> bytes:
    """The payload of an ``NBD_REP_SERVER`` reply (OPT_LIST)."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw


def rep_meta_context(context_id: int, name: str) -> bytes:
    """The payload of an ``NBD_REP_META_CONTEXT`` reply."""
    return _U32.pack(context_id) + name.encode()


def info_export(size: int, flags: int) -> bytes:
    """``NBD_INFO_EXPORT``: size and transmission flags."""
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_name(name: str) -> bytes:
    """``NBD_INFO_NAME``: the canonical export name."""
    return _U16.pack(INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    """``NBD_INFO_DESCRIPTION``: a line for a person."""
    return _U16.pack(INFO_DESCRIPTION) + clip_string(text)


_SERVED_BY = "; server "


def export_description(volume: str, layers: int, server_id: str) -> str:
    """The ``NBD_INFO_DESCRIPTION`` of a tierdisk export: a line for a person that ends with
    the id of the server process exporting it (:func:`described_server` reads it back), so a
    remote layer can check that an NBD address serves the same volume as its gRPC target."""
    return f"tierdisk volume {volume}: {layers} layer(s){_SERVED_BY}{server_id}"


def described_server(description: str) -> str:
    """The server id at the end of an :func:`export_description` ("" if there is none)."""
    _, found, server_id = description.rpartition(_SERVED_BY)
    return server_id if found else ""


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """``NBD_INFO_BLOCK_SIZE``: minimum, preferred and maximum block sizes."""
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply that ends ``NBD_OPT_EXPORT_NAME``: size, flags, and maybe 124 zeros."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (a read's data follows it when ``error`` is 0)."""
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, rtype: int, length: int, flags: int = REPLY_FLAG_DONE) -> bytes:
    """A structured reply chunk header (its payload of ``length`` bytes follows)."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)


def chunk_data_header(handle: int, offset: int, nbytes: int, done: bool) -> bytes:
    """The header and offset of an ``OFFSET_DATA`` chunk; ``nbytes`` of data follow."""
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK_DATA.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + nbytes, offset
    )


def chunk_hole(handle: int, offset: int, nbytes: int, done: bool) -> bytes:
    """A complete ``OFFSET_HOLE`` chunk: ``nbytes`` from ``offset`` read as zeros."""
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, nbytes
    )


def chunk_error(handle: int, error: int, message: str) -> bytes:
    """A final ``NBD_REPLY_TYPE_ERROR`` chunk with a message for a person."""
    text = clip_string(message)
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk_header(handle, REPLY_TYPE_ERROR, len(payload)) + payload


def chunk_block_status(
    handle: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    """A complete ``BLOCK_STATUS`` chunk: ``extents`` are ``(length, flags)`` descriptors."""
    n = len(extents)
    payload = struct.pack(f">I{2 * n}I", context_id, *(v for ext in extents for v in ext))
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, len(payload), flags) + payload


def clip_string(text: str) -> bytes:
    """UTF-8 of ``text``, cut (on a character boundary) to the protocol's string limit."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()


# -- option payloads ------------------------------------------------------------------------


class BadOption(ValueError):
    """An option payload that does not parse (answered ``NBD_REP_ERR_INVALID``)."""


def _string(data: bytes) -> str:
    if len(data) > MAX_STRING:
        raise BadOption(f"a string of {len(data)} bytes is longer than {MAX_STRING}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadOption("a string is not valid UTF-8") from None
    if "\0" in text:
        raise BadOption("a string contains NUL")
    return text


def parse_export_name(data: bytes) -> str:
    """The export name of ``NBD_OPT_EXPORT_NAME``."""
    return _string(data)


@dataclass(frozen=True)
class InfoRequest:
    """The payload of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``."""

    name: str
    requests: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    """Parse ``NBD_OPT_INFO`` / ``NBD_OPT_GO`` data: name and information requests."""
    if len(data) < 6:
        raise BadOption(f"option data of {len(data)} bytes is too short (at least 6)")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise BadOption(f"export name length {name_len} runs past the option data")
    name = _string(data[4 : 4 + name_len])
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = len(data) - 6 - name_len
    if rest != 2 * count:
        raise BadOption(f"{count} information requests need {2 * count} bytes, not {rest}")
    requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
    return InfoRequest(name, tuple(requests))


@dataclass(frozen=True)
class MetaContextRequest:
    """The payload of ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT``."""

    name: str
    queries: tuple[str, ...]


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    """Parse the export name and the queries of a meta-context option."""
    try:
        (name_len,) = _U32.unpack_from(data, 0)
        pos = 4
        if pos + name_len > len(data):
            raise BadOption("export name runs past the option data")
        name = _string(data[pos : pos + name_len])
        pos += name_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + qlen > len(data):
                raise BadOption("a query runs past the option data")
            queries.append(_string(data[pos : pos + qlen]))
            pos += qlen
    except struct.error:
        raise BadOption("option data ends too early") from None
    if pos != len(data):
        raise BadOption(f"{len(data) - pos} bytes follow the last query")
    return MetaContextRequest(name, tuple(queries))


def list_contexts(queries: Iterable[str]) -> list[str]:
    """The contexts ``NBD_OPT_LIST_META_CONTEXT`` answers for ``queries``.

    No query lists every context; ``base:`` and ``qemu:`` are namespace wildcards; an exact
    name lists itself; queries of unknown namespaces are ignored.
    """
    wanted = list(queries)
    if not wanted:
        return list(CONTEXTS)
    found: list[str] = []
    for query in wanted:
        for context in CONTEXTS:
            namespace = context.split(":", 1)[0] + ":"
            if query in (context, namespace) and context not in found:
                found.append(context)
    return found


def select_contexts(queries: Iterable[str]) -> list[str]:
    """The contexts ``NBD_OPT_SET_META_CONTEXT`` selects: exact names only."""
    found: list[str] = []
    for query in queries:
        if query in CONTEXTS and query not in found:
            found.append(query)
    return found


__all__ = sorted(name for name in globals() if not name.startswith("_") and name not in _IMPORTED)
"""Every public name of the module (its docstring says why it is not written out)."""

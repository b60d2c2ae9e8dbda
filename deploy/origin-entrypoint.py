#!/usr/bin/env python3
"""Entrypoint of the origin tier: create its base image on first start, then serve.

    origin-entrypoint.py [--config FILE] [--data-dir DIR] [other `tierdisk serve` flags]

Reads the tierdisk config (default /etc/tierdisk/origin.toml). Every `raw` layer in it that
gives no `size` and whose file does not exist yet is created with a recognisable pattern:
each sector starts with the line "tierdisk base sector N\\n" and is filled out with the byte
N % 251 + 1, so no sector is zero and any sector read back names itself. The size comes from
the environment variable BASE_IMAGE_SIZE (bytes, or "64MiB" style; default 64MiB). The file
is written beside its final name and renamed into place, so a crash never leaves a half image.
Then it execs `tierdisk serve` with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from tierdisk.client import sizes

DEFAULT_CONFIG = "/etc/tierdisk/origin.toml"
DEFAULT_DATA_DIR = "./tierdisk-data"  # DESIGN §4 default of server.data_dir
DEFAULT_SIZE = "64MiB"
CHUNK = 1 << 20


def parse_size(text: str) -> int:
    """Bytes from ``BASE_IMAGE_SIZE``: read as the server reads sizes (a bare number is bytes)."""
    return sizes.parse_size(text)[0]


def sector_pattern(first: int, count: int, sector_size: int) -> bytes:
    """The bytes of sectors first .. first+count-1 of the base image."""
    out = bytearray()
    for n in range(first, first + count):
        head = b"tierdisk base sector %d\n" % n
        out += head[:sector_size] + bytes([n % 251 + 1]) * max(sector_size - len(head), 0)
    return bytes(out)


def create_image(path: Path, size: int, sector_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    sectors, per_chunk = size // sector_size, max(CHUNK // sector_size, 1)
    with partial.open("wb") as out:
        for first in range(0, sectors, per_chunk):
            out.write(sector_pattern(first, min(per_chunk, sectors - first), sector_size))
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def missing_images(config: dict[str, Any], data_dir: Path) -> list[tuple[Path, int]]:
    """(path, sector size) of every size-less `raw` layer whose file does not exist.
    Raises AttributeError, TypeError or ValueError for a config of the wrong shape or a
    sector size the server refuses (not a power of two of at least 512 bytes)."""
    found: list[tuple[Path, int]] = []
    for volume in config.get("volumes", []):
        for layer in volume.get("layers", []):
            if layer.get("kind") != "raw" or "size" in layer or "path" not in layer:
                continue
            sector_size = layer.get("sector_size", 512)
            if not sizes.is_sector_size(sector_size):
                raise ValueError(f"sector_size {sector_size!r}")  # the server's to refuse
            path = data_dir / layer["path"]  # an absolute `path` stays as it is
            if not path.exists():
                found.append((path, sector_size))
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir")
    args, rest = parser.parse_known_args(argv)
    try:
        with open(args.config, "rb") as file:
            config = tomllib.load(file)
    except (OSError, ValueError) as error:  # (TOMLDecodeError, UnicodeDecodeError)
        print(f"origin-entrypoint: config {args.config}: {error}", file=sys.stderr)
        return 2
    try:
        size = parse_size(os.environ.get("BASE_IMAGE_SIZE", DEFAULT_SIZE))
    except ValueError as error:
        print(f"origin-entrypoint: BASE_IMAGE_SIZE: {error}", file=sys.stderr)
        return 2
    try:
        # The same precedence as `tierdisk serve`: flag, environment, file, default.
        data_dir = Path(
            args.data_dir
            or os.environ.get("TIERDISK_SERVER_DATA_DIR")
            or config.get("server", {}).get("data_dir")
            or DEFAULT_DATA_DIR
        )
        missing = missing_images(config, data_dir)
    except (AttributeError, TypeError, ValueError):
        missing = []  # a config of the wrong shape: `tierdisk serve` says what is wrong
    for path, sector_size in missing:
        if size <= 0 or size % sector_size:
            print(
                f"origin-entrypoint: BASE_IMAGE_SIZE {size} is not a positive multiple of "
                f"the {sector_size}-byte sectors of {path}",
                file=sys.stderr,
            )
            return 2
        create_image(path, size, sector_size)
        print(f"origin-entrypoint: created {path} ({size} bytes)", file=sys.stderr)
    command = ["tierdisk", "serve", "--config", args.config]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    sys.stderr.flush()
    try:
        os.execvp(command[0], [*command, *rest])
    except OSError as error:  # as a shell says it: 127 for a command not found, else 126
        print(
            f"origin-entrypoint: cannot run {command[0]}: {error.strerror} (is tierdisk "
            "installed and on PATH?)",
            file=sys.stderr,
        )
        return 127 if isinstance(error, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

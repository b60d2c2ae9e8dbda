"""Which layer files a volume keeps its data in, and the refusal to start without them
(tierdisk.service.kept_files); the start itself is in tests/test_serve.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierdisk.service.config import LayerConfig, VolumeConfig
from tierdisk.service.errors import ConfigError, StorageError
from tierdisk.service.kept_files import KeptFiles, check_kept_files, kept_files, served_by


def check(
    config: VolumeConfig,
    served: dict[str, list[str]],
    recorded: list[str] | None,
    record: str,
    stack: list[str] | None = None,
    left: list[str] | None = None,
) -> KeptFiles:
    """:func:`check_kept_files` with ``served`` as the store gives it (:func:`served_by`)."""
    return check_kept_files(config, served_by(served), recorded, record, stack or [], left or [])


def layer(kind: str, path: str | None = None, **flags: bool) -> LayerConfig:
    return LayerConfig(kind, options={} if path is None else {"path": path}, **flags)


def test_every_file_but_a_read_cache_below_the_write_path_is_kept() -> None:
    stack = VolumeConfig(
        "v",
        (
            layer("sparse", "/d/top", read_cache=True),  # the top takes writes: kept
            layer("sparse", "/d/cache", read_cache=True),  # copies of what is below
            layer("remote"),
            layer("raw", "/d/base"),
        ),
    )
    assert kept_files(stack) == ["/d/top", "/d/base"]
    through = VolumeConfig(
        "w",
        (
            layer("ram", write_through=True),
            layer("sqlite", "/d/durable", read_cache=True),  # on the write path: kept
            layer("raw", "/d/base"),
        ),
    )
    assert kept_files(through) == ["/d/durable", "/d/base"]
    read_only = VolumeConfig(
        "r",
        (
            layer("sparse", "/d/cache", read_cache=True),  # takes no writes: copies only
            LayerConfig("raw", options={"path": "/d/golden", "read_only": True}),
        ),
        read_only=True,
    )
    assert kept_files(read_only) == [], "a read-only raw image is never made anew anyway"


def _three_layers(folder: Path) -> tuple[VolumeConfig, Path, Path]:
    """Volume ``v``: a sparse top whose file is there (``present``), a sparse read cache,
    and a raw base whose file is not (``lost``)."""
    present, lost, cache = folder / "present", folder / "lost", folder / "cache"
    present.write_bytes(b"data")
    layers = (
        layer("sparse", str(present)),
        layer("sparse", str(cache), read_cache=True),
        layer("raw", str(lost)),
    )
    return VolumeConfig("v", layers), present, lost


def test_a_recorded_file_that_is_missing_is_refused(tmp_path: Path) -> None:
    stack, present, lost = _three_layers(tmp_path)
    check(stack, {str(present): ["v"]}, [str(present)], "rec.json")  # the cache
    check(stack, {}, [], "rec.json")  # never served: a new volume
    served = {str(present): ["v"], str(lost): ["v"]}
    with pytest.raises(ConfigError, match=rf"volume 'v', layer 2: {lost} is missing") as info:
        check(stack, served, list(served), "/d/rec.json")
    assert "but this volume was served from it before (as /d/rec.json records)" in str(info.value)
    assert "delete the volume's entry from rec.json" in str(info.value)
    assert isinstance(info.value.__cause__, StorageError)
    present.write_bytes(b"")  # emptied: its layer would make it anew, empty
    with pytest.raises(ConfigError, match=rf"volume 'v', layer 0: {present} is empty"):
        check(stack, {str(present): ["v"]}, [str(present)], "rec.json")


def test_a_recorded_file_counts_whatever_its_role_and_its_volume_s_name(tmp_path: Path) -> None:
    """A file that took writes holds them still once its layer is made a read cache in a
    read-only volume, or its volume renamed: missing, it is refused, not made empty; the
    message names every entry that records it (deleting one would not do)."""
    lost = tmp_path / "lost"
    copies_now = VolumeConfig(
        "v", (layer("sparse", str(lost), read_cache=True), layer("ram")), read_only=True
    )
    assert kept_files(copies_now) == []
    with pytest.raises(ConfigError, match=rf"layer 0: {lost} is missing, but this volume"):
        check(copies_now, {str(lost): ["v"]}, [str(lost)], "rec.json")
    renamed = VolumeConfig("w", (layer("sparse", str(lost)),))
    with pytest.raises(ConfigError) as info:
        check(renamed, {str(lost): ["v"]}, [], "rec.json")
    assert f"{lost} is missing, but volume 'v' was served from it before" in str(info.value)
    assert "delete the entry of 'v' from rec.json" in str(info.value)
    with pytest.raises(ConfigError) as info:  # renamed and served since: both record it
        check(renamed, {str(lost): ["v", "w"]}, [str(lost)], "rec.json")
    assert "but volumes 'v', 'w' were served from it before" in str(info.value)
    assert "delete the entries of 'v', 'w' from rec.json" in str(info.value)


def test_a_recorded_file_is_found_through_a_symlink(tmp_path: Path) -> None:
    """Recorded under a link's spelling, configured under the real one (or the other way):
    the same file."""
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "link")
    stack = VolumeConfig("v", (layer("sparse", str(tmp_path / "disk" / "v")),))
    recorded = [str(tmp_path / "link" / "v")]
    with pytest.raises(ConfigError, match="is missing, but this volume was served from it"):
        check(stack, {recorded[0]: ["v"]}, recorded, "rec.json")


def test_what_is_recorded_and_what_was_dropped(tmp_path: Path) -> None:
    """What a start records: the files the config keeps, and those recorded before that are
    still in the stack, whatever their role, in layer order; a recorded file no layer is at
    any more is dropped (the start warns of it)."""
    for name in ("was-top", "base", "gone"):
        (tmp_path / name).write_bytes(b"data")
    was_top, base, gone = (str(tmp_path / name) for name in ("was-top", "base", "gone"))
    stack = VolumeConfig(
        "v",
        (
            layer("sparse", was_top, read_cache=True),
            layer("raw", base, read_cache=True),  # below the write path: copies
            layer("remote"),
        ),
        read_only=True,
    )
    every = [was_top, base]  # every layer file of the stack: recorded as "stack"
    assert check(stack, {}, [], "rec.json") == KeptFiles([], [], every)
    served = {path: ["v"] for path in (was_top, base, gone)}
    found = check(stack, served, list(served), "rec.json")
    assert found == KeptFiles([was_top, base], [gone], every, [gone])
    writable = VolumeConfig("w", (layer("sparse", "/d/top"), layer("raw", base)))
    found = check(writable, {base: ["w"]}, [base], "rec.json")
    assert found == KeptFiles(["/d/top", base], [], ["/d/top", base])


def test_a_write_through_read_cache_holds_copies_only() -> None:
    """What it takes goes on below it: its file may be deleted to reset the cache."""
    stack = VolumeConfig(
        "v",
        (
            layer("sparse", "/d/cache", read_cache=True, write_through=True),
            layer("raw", "/d/base"),
        ),
    )
    assert kept_files(stack) == ["/d/base"]


def test_an_older_builds_entry_counts_every_file_as_served_from(tmp_path: Path) -> None:
    """``recorded`` None: the volume was served by a build that recorded no files. Each file
    it keeps counts, a read cache's still does not; the message says the entry is the way
    out."""
    stack, present, lost = _three_layers(tmp_path)
    with pytest.raises(ConfigError, match=rf"volume 'v', layer 2: {lost} is missing") as info:
        check(stack, {}, None, "/data/rec.json")
    assert "an older tierdisk wrote it" in str(info.value)
    assert str(info.value).endswith("delete the volume's entry from rec.json")
    lost.write_bytes(b"base")
    found = check(stack, {}, None, "/data/rec.json")  # the cache may be made again
    assert (found.to_record, found.dropped) == ([str(present), str(lost)], [])


def test_a_recorded_path_that_is_no_regular_file_is_left_to_its_layer(tmp_path: Path) -> None:
    """A FIFO where a recorded file was is not called "empty": the layer refuses it as not a
    regular file (tests/test_sparse.py, test_raw.py)."""
    path = tmp_path / "v"
    os.mkfifo(path)
    stack = VolumeConfig("v", (layer("sparse", str(path)),))
    check(stack, {str(path): ["v"]}, [str(path)], "rec.json")


def test_layers_in_the_other_order_than_recorded_are_refused(tmp_path: Path) -> None:
    """Two recorded files swapped by an edit: reads would take the lower one's sectors over
    what was written above it. Refused naming both; a new layer between them, or a read
    cache, is no reordering."""
    for name in ("top", "mid", "base"):
        (tmp_path / name).write_bytes(b"data")
    top, mid, base = (str(tmp_path / name) for name in ("top", "mid", "base"))
    recorded = [top, base]
    served = {top: ["v"], base: ["v"]}
    swapped = VolumeConfig("v", (layer("sparse", base), layer("raw", top)))
    with pytest.raises(ConfigError) as info:
        check(swapped, served, recorded, "/data/rec.json")
    message = str(info.value)
    assert message.startswith(f"volume 'v', layer 1: {top} is below layer 0 ({base}) now")
    assert message.endswith("delete the volume's entry from rec.json")
    between = VolumeConfig(
        "v",
        (layer("sparse", top), layer("sparse", mid, read_cache=True), layer("raw", base)),
    )
    assert check(between, served, recorded, "rec.json").to_record == [top, base]


def test_a_file_that_left_the_stack_is_remembered_and_its_return_reported(
    tmp_path: Path,
) -> None:
    """A layer dropped by one start (a top, or a read cache that holds copies only) is in
    ``left`` from then on; a later start with a layer at it again reports it in
    ``returned`` (the server warns: the layers below may have taken writes meanwhile), and
    forgets it."""
    for name in ("top", "cache", "base"):
        (tmp_path / name).write_bytes(b"data")
    top, cache, base = (str(tmp_path / name) for name in ("top", "cache", "base"))
    full = VolumeConfig(
        "v", (layer("sparse", top), layer("sparse", cache, read_cache=True), layer("raw", base))
    )
    first = check(full, {}, [], "rec.json")
    assert first.stack == [top, cache, base] and not first.left
    only_base = VolumeConfig("v", (layer("raw", base),))
    served = {path: ["v"] for path in first.to_record}
    second = check(only_base, served, first.to_record, "rec.json", first.stack, first.left)
    assert second.dropped == [top] and second.left == [top, cache]
    assert not second.returned
    third = check(only_base, {base: ["v"]}, [base], "rec.json", [base], second.left)
    assert third.left == [top, cache]  # kept while they stay out
    back = VolumeConfig("v", (layer("sparse", cache, read_cache=True), layer("raw", base)))
    fourth = check(back, {base: ["v"]}, [base], "rec.json", [base], third.left)
    assert fourth.returned == [(0, cache)] and fourth.left == [top]
    os.unlink(top)  # deleted to make it afresh, as the warning says: nothing to warn of
    again = VolumeConfig("v", (layer("sparse", top), layer("raw", base)))
    fifth = check(again, {base: ["v"]}, [base], "rec.json", [base], fourth.left)
    assert fifth.returned == [] and fifth.left == []

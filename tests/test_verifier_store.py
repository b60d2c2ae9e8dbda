"""The file that keeps write verifiers across clean stops (tierdisk.service.verifier_store)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierdisk.service.verifier_store import FILE_NAME, VerifierStore, new_verifier


def _entries(folder: Path) -> dict[str, dict[str, object]]:
    doc = json.loads((folder / FILE_NAME).read_text())
    assert doc["format"] == 1
    volumes: dict[str, dict[str, object]] = doc["volumes"]
    return volumes


def _served(folder: Path, names: list[str]) -> VerifierStore:
    """The store of a start that got as far as serving: opened, every volume marked."""
    store = VerifierStore.open(str(folder), names)
    store.mark_unclean(names)
    return store


def _crashed_after_marking(
    folder: Path, names: list[str], marked: list[str], kept_writes: dict[str, bool] | None = None
) -> None:
    """A server process that opened the store for ``names``, marked ``marked`` (served
    them, with ``kept_writes`` as their stacks' when given) and died without closing it (a
    crash)."""
    crash = (
        "import json, os, sys\n"
        "from tierdisk.service.verifier_store import VerifierStore\n"
        "names, marked = json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
        "store = VerifierStore.open(sys.argv[1], names)\n"
        "store.kept_writes.update(json.loads(sys.argv[4]))\n"
        "store.mark_unclean(marked)\n"
        "os._exit(0)\n"
    )
    args = [str(folder), json.dumps(names), json.dumps(marked), json.dumps(kept_writes or {})]
    subprocess.run([sys.executable, "-c", crash, *args], check=True, timeout=60)


def test_new_verifiers_are_non_zero_and_differ_from_the_old_one() -> None:
    assert all(new_verifier(1) not in (0, 1) for _ in range(100))
    assert 0 < new_verifier() < 1 << 64


def test_a_clean_stop_keeps_each_volumes_verifier(tmp_path: Path) -> None:
    first = _served(tmp_path, ["a", "b"])
    assert set(first.verifiers) == {"a", "b"} and all(first.verifiers.values())
    first.close(first.verifiers, clean=["a", "b"])
    second = _served(tmp_path, ["a", "b"])
    assert second.verifiers == first.verifiers
    second.close(second.verifiers, clean=["a", "b"])


def test_the_start_marks_every_volume_unclean_before_serving(tmp_path: Path) -> None:
    store = _served(tmp_path, ["a"])
    try:
        assert _entries(tmp_path) == {"a": {"verifier": store.verifiers["a"], "clean": False}}
    finally:
        store.close(store.verifiers, clean=["a"])
    assert _entries(tmp_path)["a"]["clean"] is True


def test_a_start_that_serves_nothing_writes_nothing(tmp_path: Path) -> None:
    """A config error, a stop before any volume opened: no file where there was none, and
    a clean entry stays clean."""
    store = VerifierStore.open(str(tmp_path), ["a"])
    store.close(store.verifiers, clean=[])
    assert list(tmp_path.iterdir()) == []
    first = _served(tmp_path, ["a"])
    first.close(first.verifiers, clean=["a"])
    again = VerifierStore.open(str(tmp_path), ["a"])
    again.close(again.verifiers, clean=[])
    last = _served(tmp_path, ["a"])
    assert last.verifiers == first.verifiers
    last.close(last.verifiers, clean=["a"])


def test_a_crash_or_an_unclean_stop_gives_a_new_verifier(tmp_path: Path) -> None:
    """...and names the volume among :attr:`VerifierStore.unclean` (the server logs and
    counts it); a volume new to the file is not one."""
    first = _served(tmp_path, ["a", "b"])
    assert first.unclean == {}  # the first start: nothing was lost
    first.close(first.verifiers, clean=["b"])  # a's final flush failed
    second = _served(tmp_path, ["a", "b", "c"])
    assert second.verifiers["a"] != first.verifiers["a"]
    assert second.verifiers["b"] == first.verifiers["b"]
    assert second.unclean == {"a": None}  # (whether that run kept its writes: not said)
    second.close(second.verifiers, clean=["a", "b", "c"])
    _crashed_after_marking(tmp_path, ["a", "b"], ["a", "b"])
    third = _served(tmp_path, ["a", "b", "c"])
    assert third.verifiers["a"] != second.verifiers["a"]
    assert third.verifiers["b"] != second.verifiers["b"]
    assert third.unclean == {"a": None, "b": None}  # c was not served by the run that crashed
    third.close(third.verifiers, clean=[])


def test_an_unclean_entry_says_whether_the_run_that_crashed_kept_its_writes(
    tmp_path: Path,
) -> None:
    """The mark records the marking run's ``kept_writes`` (the server sets it from the
    volume's stack before it serves it): after a crash the next start knows whether the
    lost run's write path was ``ram`` only (nothing it held was to outlive it: no warning)
    whatever the config is now."""
    _crashed_after_marking(tmp_path, ["a", "b"], ["a", "b"], {"a": True, "b": False})
    assert _entries(tmp_path)["a"]["kept_writes"] is True
    after = _served(tmp_path, ["a", "b"])
    assert after.unclean == {"a": True, "b": False}
    after.close(after.verifiers, clean=["a", "b"])


def test_the_verifier_a_volume_has_at_the_stop_is_kept(tmp_path: Path) -> None:
    """A flush that found writes lost renewed the volume's verifier while it ran."""
    store = _served(tmp_path, ["a"])
    renewed = new_verifier(store.verifiers["a"])
    store.close({"a": renewed}, clean=["a"])
    again = _served(tmp_path, ["a"])
    assert again.verifiers["a"] == renewed
    again.close(again.verifiers, clean=["a"])


def test_volumes_no_longer_configured_keep_their_entries(tmp_path: Path) -> None:
    first = _served(tmp_path, ["a", "b"])
    first.close(first.verifiers, clean=["a", "b"])
    only_a = _served(tmp_path, ["a"])
    only_a.close(only_a.verifiers, clean=["a"])
    both = _served(tmp_path, ["a", "b"])
    assert both.verifiers == first.verifiers
    both.close(both.verifiers, clean=["a", "b"])


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"format": 2, "volumes": {}}',
        b'{"format": 1, "volumes": []}',
        b'{"format": 1, "volumes": {"a": {"verifier": 0, "clean": true}}}',
        b'{"format": 1, "volumes": {"a": {"verifier": -5, "clean": true}}}',
        b'{"format": 1, "volumes": {"a": {"verifier": 18446744073709551616, "clean": true}}}',
        b'{"format": 1, "volumes": {"a": {"verifier": 5.0, "clean": true}}}',
        b'{"format": 1, "volumes": {"a": {"verifier": 5, "clean": 1}}}',
        b"[" * 100_000,
    ],
)
def test_a_file_not_of_this_format_counts_as_no_clean_stop(tmp_path: Path, content: bytes) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    store = _served(tmp_path, ["a"])
    try:
        assert store.verifiers["a"] not in (0, 5)
        assert _entries(tmp_path)["a"] == {"verifier": store.verifiers["a"], "clean": False}
    finally:
        store.close(store.verifiers, clean=["a"])


def test_a_file_another_server_holds_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = _served(tmp_path, ["a"])
    held = (tmp_path / FILE_NAME).read_bytes()
    try:
        with caplog.at_level(logging.WARNING, "tierdisk.service.verifier_store"):
            other = _served(tmp_path, ["a"])
        assert "another server holds it" in caplog.text
        assert other.verifiers["a"] != holder.verifiers["a"]
        other.close(other.verifiers, clean=["a"])  # keeps nothing
        assert (tmp_path / FILE_NAME).read_bytes() == held
    finally:
        holder.close(holder.verifiers, clean=["a"])


def test_a_folder_it_cannot_write_is_a_warning_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"  # (root may write anywhere: a folder that is not there)
    with caplog.at_level(logging.WARNING, "tierdisk.service.verifier_store"):
        store = _served(missing, ["a"])
    assert "cannot be kept" in caplog.text
    assert store.verifiers["a"] != 0
    store.close(store.verifiers, clean=["a"])
    assert not missing.exists()


def test_a_symlink_in_its_place_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (tmp_path / FILE_NAME).symlink_to(target)
    with caplog.at_level(logging.WARNING, "tierdisk.service.verifier_store"):
        store = _served(tmp_path, ["a"])
    store.close(store.verifiers, clean=["a"])
    assert target.read_text() == "precious"
    assert "cannot be kept" in caplog.text


def test_only_the_volumes_served_are_marked_unclean(tmp_path: Path) -> None:
    """A volume still waiting for its tier when the server was killed served nothing: it
    keeps its clean entry. One marked but never served (its start was stopped) is written
    clean at the stop."""
    first = _served(tmp_path, ["a", "b", "c"])
    first.close(first.verifiers, clean=["a", "b", "c"])
    _crashed_after_marking(tmp_path, ["a", "b", "c"], ["a"])
    second = VerifierStore.open(str(tmp_path), ["a", "b", "c"])
    assert second.verifiers["a"] != first.verifiers["a"]
    assert second.verifiers["b"] == first.verifiers["b"]
    second.mark_unclean(["b", "c"])
    second.close({"b": second.verifiers["b"]}, clean=[])  # b served, not clean; c never served
    assert _entries(tmp_path)["b"]["clean"] is False
    assert _entries(tmp_path)["c"] == {"verifier": first.verifiers["c"], "clean": True}


def test_the_files_a_volume_was_served_from_are_recorded_and_kept(tmp_path: Path) -> None:
    """What a start records as each volume's kept files (kept_files) is what the next one
    reads back, through a crash too; a volume not served in a run keeps what it had, and a
    volume new to the file has none."""
    store = VerifierStore.open(str(tmp_path), ["a", "b"])
    assert store.recorded_files("a") == ()
    store.files = {"a": ["/disk/a", "/disk/a2"], "b": ["/disk/b"]}
    store.mark_unclean(["a", "b"])
    store.close({"a": store.verifiers["a"], "b": store.verifiers["b"]}, {"a", "b"})
    _crashed_after_marking(tmp_path, ["a"], [])  # a run that served nothing
    again = VerifierStore.open(str(tmp_path), ["a", "b", "c"])
    assert again.recorded_files("a") == ("/disk/a", "/disk/a2")
    assert again.recorded_files("b") == ("/disk/b",)
    assert again.recorded_files("c") == ()
    again.files = {"a": ["/disk/a3"]}
    again.mark_unclean(["a"])  # "b" is not served in this run: it keeps its files
    again.close({"a": again.verifiers["a"]}, {"a"})
    last = VerifierStore.open(str(tmp_path), ["a", "b"])
    assert last.recorded_files("a") == ("/disk/a3",)
    assert last.recorded_files("b") == ("/disk/b",)
    last.close({}, set())


@pytest.mark.parametrize(
    ("killed_in", "record_after"),
    [("pwrite_all", "the old one"), ("os.rename", "the old one"), ("fsync_folder", "the new one")],
)
def test_a_crash_while_the_record_changes_leaves_the_old_or_the_new_one(
    tmp_path: Path, killed_in: str, record_after: str
) -> None:
    """A server killed (SIGKILL) in the middle of writing the record, as it marks its
    volumes before serving them: the record is whole, old or new, with every file it
    recorded (a record rewritten in place was left empty by a kill after its truncation,
    and the next start served a volume whose disk was missing as a new, empty one)."""
    first = VerifierStore.open(str(tmp_path), ["a", "b"])
    first.files = {"a": ["/disk/a"], "b": ["/disk/b"]}
    first.mark_unclean(["a", "b"])
    first.close(first.verifiers, {"a", "b"})
    crash = (
        "import os, signal, sys\n"
        "from tierdisk.service import fileio, verifier_store\n"
        "def killed(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"if {killed_in!r} == 'os.rename':\n"
        "    os.rename = killed\n"
        f"elif {killed_in!r} == 'pwrite_all':\n"  # (the new file's write: fileio's)
        "    fileio.pwrite_all = killed\n"
        "else:\n"
        f"    setattr(verifier_store, {killed_in!r}, killed)\n"
        "store = verifier_store.VerifierStore.open(sys.argv[1], ['a', 'b'])\n"
        "store.files = {'a': ['/disk/a'], 'b': ['/disk/b']}\n"
        "store.mark_unclean(['a'])\n"
    )
    died = subprocess.run([sys.executable, "-c", crash, str(tmp_path)], timeout=60)
    assert died.returncode == -9, "killed where the record is written"
    entries = _entries(tmp_path)  # whole: it parses
    assert entries["a"]["clean"] is (record_after == "the old one")
    assert entries["b"] == {"verifier": first.verifiers["b"], "clean": True, "files": ["/disk/b"]}
    after = VerifierStore.open(str(tmp_path), ["a", "b"])
    assert after.recorded_files("a") == ("/disk/a",)
    assert after.served_files() == {"/disk/a": ["a"], "/disk/b": ["b"]}
    after.close({}, set())


@pytest.mark.parametrize("content", [b"", b'{"format": 1, "volumes": {"a": {"verifier": 5, "cl'])
def test_a_record_that_cannot_be_read_counts_every_file_of_each_volume(
    tmp_path: Path, content: bytes
) -> None:
    """An empty or torn record (an older build's crash while it rewrote the file in place)
    does not say which files a volume was served from: each file of each configured volume
    counts (``recorded_files`` None), in this start and in later ones until a run that
    serves the volume records its files (a volume not served in this run keeps an entry
    that says so)."""
    (tmp_path / FILE_NAME).write_bytes(content)
    store = VerifierStore.open(str(tmp_path), ["a", "b"])
    assert store.recorded_files("a") is None and store.recorded_files("b") is None
    store.files = {"a": ["/disk/a"]}
    store.mark_unclean(["a"])  # "b" waits for its tier, say, and is never served
    store.close(store.verifiers, {"a"})
    later = VerifierStore.open(str(tmp_path), ["a", "b", "c"])
    assert later.recorded_files("a") == ("/disk/a",)
    assert later.recorded_files("b") is None
    assert later.recorded_files("c") == ()  # new to the record: made afresh
    later.close({}, set())


def test_a_fifo_in_place_of_the_record_is_no_hang(tmp_path: Path) -> None:
    """Opening a FIFO to read waits for a writer: the start would hang. It is no record:
    nothing is kept, and as the record cannot be read, each file of each volume counts."""
    os.mkfifo(tmp_path / FILE_NAME)
    store = VerifierStore.open(str(tmp_path), ["a"])  # (pytest's timeout ends a hang)
    assert not store.usable
    assert store.recorded_files("a") is None
    store.close({}, set())


def test_a_stale_new_record_is_never_written_through(tmp_path: Path) -> None:
    """The new record is made afresh: one a crash left, or a hard link planted in its
    place, is replaced, not written through (the linked file keeps its data)."""
    other = tmp_path / "other"
    other.write_bytes(b"precious")
    os.link(other, tmp_path / (FILE_NAME + ".new"))
    store = _served(tmp_path, ["a"])
    store.close(store.verifiers, clean=["a"])
    assert other.read_bytes() == b"precious"
    assert _entries(tmp_path)["a"]["clean"] is True


def test_a_new_record_that_cannot_be_made_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder where the new record goes: nothing is kept, and the warning names it."""
    (tmp_path / (FILE_NAME + ".new")).mkdir()
    with caplog.at_level(logging.WARNING, "tierdisk.service.verifier_store"):
        store = _served(tmp_path, ["a"])
    assert not store.usable
    assert f"{FILE_NAME}.new" in caplog.text
    store.close(store.verifiers, clean=["a"])


def test_a_record_another_server_holds_still_guards_the_files(tmp_path: Path) -> None:
    """A second server on the same data_dir keeps no verifiers, but what the record says
    of the files each volume was served from still holds for it (a missing one is
    refused: :mod:`tierdisk.service.kept_files`); a record it cannot read at all counts
    every file."""
    first = VerifierStore.open(str(tmp_path), ["a"])
    first.files = {"a": ["/disk/a"]}
    first.mark_unclean(["a"])
    first.close(first.verifiers, {"a"})
    holder = _served(tmp_path, ["a"])
    try:
        other = VerifierStore.open(str(tmp_path), ["a", "b"])
        assert not other.usable
        assert other.recorded_files("a") == ("/disk/a",)
        assert other.recorded_files("b") == ()
        other.close({}, set())
    finally:
        holder.close(holder.verifiers, clean=["a"])


@pytest.mark.parametrize(
    "volumes",
    [{"a": 5}, {"a": {"verifier": 5, "clean": True, "files": None}}],
    ids=["an entry that is not a table", "files that are not a list"],
)
def test_a_damaged_entry_does_not_say_which_files(
    tmp_path: Path, volumes: dict[str, object]
) -> None:
    """Valid JSON whose entry is not as written: which files the volume was served from
    is not known (each counts), not taken for none."""
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": 1, "volumes": volumes}))
    store = VerifierStore.open(str(tmp_path), ["a"])
    assert store.recorded_files("a") is None
    store.close({}, set())


def test_an_entry_of_a_build_that_recorded_no_files_is_told_apart(tmp_path: Path) -> None:
    """An entry with a verifier and no ``files`` (written before files were recorded) gives
    ``None``: served, from files not known; a volume new to the file gives none."""
    (tmp_path / "write-verifiers.json").write_text(
        json.dumps({"format": 1, "volumes": {"old": {"verifier": 7, "clean": True}}})
    )
    store = VerifierStore.open(str(tmp_path), ["old", "new"])
    assert store.recorded_files("old") is None
    assert store.recorded_files("new") == ()
    store.close({}, set())


def test_every_recorded_file_is_known_with_the_volume_served_from_it(tmp_path: Path) -> None:
    """Of every entry, configured now or not: a renamed volume's files are still its."""
    store = VerifierStore.open(str(tmp_path), ["a", "b"])
    store.files = {"a": ["/disk/a", "/disk/shared"], "b": ["/disk/b"]}
    store.mark_unclean(["a", "b"])
    store.close({"a": store.verifiers["a"], "b": store.verifiers["b"]}, {"a", "b"})
    again = VerifierStore.open(str(tmp_path), ["renamed"])
    assert again.served_files() == {"/disk/a": ["a"], "/disk/shared": ["a"], "/disk/b": ["b"]}
    again.close({}, set())


def test_recorded_files_no_path_can_name_are_left_out(tmp_path: Path) -> None:
    """A damaged or hand-edited record: a NUL byte in a path, a number."""
    (tmp_path / "write-verifiers.json").write_text(
        json.dumps(
            {
                "format": 1,
                "volumes": {
                    "v": {"verifier": 7, "clean": True, "files": ["/d/a\u0000b", 5, "/d/c"]}
                },
            }
        )
    )
    store = VerifierStore.open(str(tmp_path), ["v"])
    assert store.recorded_files("v") == ("/d/c",)
    assert store.served_files() == {"/d/c": ["v"]}
    store.close({}, set())


def test_an_older_builds_crashed_entry_with_no_files_does_not_say_what_it_kept(
    tmp_path: Path,
) -> None:
    """An older build recorded no files for a remote-only stack as for a ram-only one; its
    crashed entry without ``kept_writes`` does not say which it was, so the warning is
    judged by the stack the volume has now (``None``), not taken for ram-only."""
    (tmp_path / FILE_NAME).write_text(
        json.dumps({"format": 1, "volumes": {"a": {"verifier": 5, "clean": False, "files": []}}})
    )
    after = _served(tmp_path, ["a"])
    assert after.unclean == {"a": None} and after.verifiers["a"] != 5
    after.close(after.verifiers, clean=["a"])

"""``client.layer_layout``: which file's lock shows that a file is a running layer's."""

from __future__ import annotations

import pytest

from tierdisk.client.layer_layout import FILES_BESIDE, LOCK_SUFFIX, lock_files
from tierdisk.service.layers.layer_files import files_beside


@pytest.mark.parametrize("kind", sorted(FILES_BESIDE))
def test_every_file_of_a_layer_names_the_file_the_layer_locks(kind: str) -> None:
    """The layer's own file and each file beside it lead to the one its server ``flock``s,
    so ``export``/``read -o`` onto any of them asks that lock."""
    path = "/v/top.img"
    for name in [path, *files_beside(kind, path)]:
        assert path + LOCK_SUFFIX[kind] in lock_files(name), name


def test_the_files_own_lock_is_asked_first() -> None:
    """A raw or sparse data file is locked itself: that lock comes before a database's."""
    assert lock_files("/v/top.db") == ["/v/top.db", "/v/top.db.lock"]
    assert lock_files("/v/top.db-wal") == ["/v/top.db-wal", "/v/top.db-wal.lock", "/v/top.db.lock"]


def test_a_name_that_is_only_a_suffix_is_no_layers_file() -> None:
    """``.map`` alone (a hidden file named so) has no stem: only its own lock is asked."""
    assert lock_files(".map") == [".map", ".map.lock"]

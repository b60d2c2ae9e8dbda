"""Layer files that cannot be a layer's own: one file used twice in a config, or a server file.

Checked once a config's volumes are parsed, their layers' ``path`` options absolute
(:func:`~.config.load_config`): :func:`check_shared_paths` refuses a file that two layers
would use, however the paths name it (a symlink, a hard link: the same device and inode),
read-only raw images excepted, with the files a layer makes beside its own
(:func:`~.layers.layer_files.files_beside`) counted as that layer's; :func:`check_server_files`
refuses the server's record of write verifiers in ``data_dir`` (:mod:`.verifier_store`).
Either is a :class:`~.errors.ConfigError` naming the volume and the layer index.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from .errors import ConfigError
from .verifier_store import FILE_NAME as VERIFIERS_FILE
from .verifier_store import NEW_SUFFIX as VERIFIERS_NEW_SUFFIX

if TYPE_CHECKING:
    from .config import VolumeConfig

__all__ = ["check_server_files", "check_shared_paths"]


def _file_keys(path: str) -> list[str]:
    """``path`` with its symlinks resolved and, for a file that exists, its device and inode
    numbers: the keys under which two layers' files are one file (a hard link is one file
    under another name)."""
    keys = [os.path.realpath(path)]
    with contextlib.suppress(OSError):
        found = os.stat(path)
        keys.append(f"inode {found.st_dev}:{found.st_ino}")
    return keys


def check_shared_paths(volumes: list[VolumeConfig]) -> None:
    """Refuse a layer file used by two layers of this config (the second would find it
    locked, "in use by another process"), naming both, whether the two paths name it
    through a symlink or a hard link; read-only raw images are the exception: any number of
    layers may read one. A file a layer makes beside its own (a
    sparse layer's map, a sqlite layer's lock file and WAL:
    :func:`~.layers.layer_files.files_beside`) counts as that layer's: another layer there
    would have it replaced or removed under it."""
    from .layers.layer_files import files_beside  # (the layers package imports .config)

    users: dict[str, tuple[str, int, str, bool, bool]] = {}  # _file_keys -> first user
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            path = layer.options.get("path")
            if not isinstance(path, str):
                continue
            shareable = layer.kind == "raw" and bool(layer.options.get("read_only"))
            files = [(path, False)] + [(f, True) for f in files_beside(layer.kind, path)]
            for file, beside in files:
                keys = _file_keys(file)
                first = next((users[key] for key in keys if key in users), None)
                if first is None:
                    for key in keys:
                        users[key] = (volume.name, index, path, beside, shareable and not beside)
                    continue
                if shareable and not beside and first[4]:
                    continue
                other = f"volume {first[0]!r}, layer {first[1]}"
                if not beside and not first[3]:
                    problem = f"path {path} is used twice in this config, also by {other}"
                elif not beside:
                    problem = (
                        f"path {path} is a file that {other} (at {first[2]}) makes beside its own"
                    )
                else:
                    their = f"makes beside its own (at {first[2]})" if first[3] else "is at"
                    problem = (
                        f"the {layer.kind} layer at {path} makes {file} beside it, which "
                        f"{other} {their}"
                    )
                raise ConfigError(
                    f"{problem}: a layer's files hold one layer (only read_only raw images "
                    "can be shared)",
                    volume=volume.name,
                    layer=index,
                )


def check_server_files(volumes: list[VolumeConfig], data_dir: str) -> None:
    """Refuse a layer file that is one of the server's own files in ``data_dir`` (the
    write verifier record, or the new one written before it replaces it:
    :mod:`.verifier_store`): the record's next change would replace the layer's data."""
    record = os.path.realpath(os.path.join(data_dir, VERIFIERS_FILE))
    ours = {record, record + VERIFIERS_NEW_SUFFIX}
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            path = layer.options.get("path")
            if path is not None and os.path.realpath(path) in ours:
                raise ConfigError(
                    f"path {path} is the server's own record of write verifiers (in "
                    "data_dir): a layer's file needs a path of its own",
                    volume=volume.name,
                    layer=index,
                )

"""tierdisk.client.cli_errors (client/cli_errors.py): how the ``tierdisk`` command words a
failed call in one line (:func:`~tierdisk.client.cli_errors.describe`, as the command uses it
through :mod:`tierdisk.client.cli`)."""

from __future__ import annotations

import pytest

from tierdisk.client import cli_errors, errors


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (
            errors.ReadOnlyVolume("volume 'ro' is read-only: cannot write", volume="ro"),
            "volume 'ro': read-only: cannot write",
        ),
        (
            errors.InvalidArgument("volume 'v': size must be at least one sector", volume="v"),
            "volume 'v': invalid argument: size must be at least one sector",
        ),
        (
            errors.Unavailable("volume 'o' is not ready yet: a remote tier is down", volume="o"),
            "volume 'o' on S: unavailable: not ready yet: a remote tier is down",
        ),
        (
            errors.VolumeNotFound("no volume named 'x' on this server", volume="x"),
            "volume 'x': not found: no volume named 'x' on this server",
        ),
        (errors.FailedPrecondition("volume 'v'", volume="v"), "volume 'v': refused"),
        (  # another volume's name, or a longer one: kept as is
            errors.OutOfRange("volume 'vv': sectors past the end", volume="v"),
            "volume 'v': out of range: volume 'vv': sectors past the end",
        ),
        (errors.Unavailable("connection refused"), "server S: unavailable: connection refused"),
    ],
)
def test_describe_names_the_volume_once(err: errors.TierdiskError, line: str) -> None:
    assert cli_errors.describe(err, "S") == line


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (
            errors.Unimplemented.of_call("Method not found!", target="S", method="GetVolume"),
            "server S: does not serve tierdisk.v1.BlockDevice, or is too old for GetVolume "
            "(UNIMPLEMENTED: Method not found!)",
        ),
        (  # made without the address or the method: still the server, never the volume
            errors.Unimplemented("the server does not serve it", volume="v"),
            "server S: does not serve it",
        ),
    ],
)
def test_describe_blames_the_server_for_unimplemented(err: errors.TierdiskError, line: str) -> None:
    assert cli_errors.describe(err, "S") == line

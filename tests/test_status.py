"""``status.nbd_error``: the NBD error value an NBD client gets for each failure."""

from __future__ import annotations

import errno

import pytest

from tierdisk.service import errors as serr
from tierdisk.service import nbd_protocol as P
from tierdisk.service.status import nbd_error


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (errno.EPERM, P.EPERM),
        (errno.EACCES, P.EPERM),
        (errno.EROFS, P.EPERM),
        (errno.ENOSPC, P.ENOSPC),
        (errno.EDQUOT, P.ENOSPC),
        (errno.EFBIG, P.ENOSPC),
        (errno.EINVAL, P.EINVAL),
        (errno.EIO, P.EIO),
        (errno.ENODEV, P.EIO),
    ],
    ids=lambda value: errno.errorcode.get(value, str(value)),
)
def test_a_storage_failure_no_layer_named_keeps_its_kind(number: int, expected: int) -> None:
    """An ``OSError`` from storage: read-only and denied are EPERM, out of space (a quota,
    a file-size limit) ENOSPC, a bad argument EINVAL, anything else EIO."""
    exc = OSError(number, "storage")
    assert nbd_error(exc, writing=True) == nbd_error(exc, writing=False) == expected


@pytest.mark.parametrize(
    ("exc", "writing", "expected"),
    [
        (serr.OutOfRange("x"), False, P.EINVAL),
        (serr.OutOfRange("x"), True, P.ENOSPC),
        (serr.ReadOnlyError("x"), True, P.EPERM),
        (serr.PermissionDenied("x"), False, P.EPERM),
        (serr.NoSpace("x"), True, P.ENOSPC),
        (serr.InvalidArgument("x"), False, P.EINVAL),
        (serr.Unavailable("x"), False, P.EIO),
        (serr.StorageError("x"), True, P.EIO),
        (ValueError("a fault of ours"), False, P.EIO),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_a_domain_error_has_the_value_its_kind_says(
    exc: BaseException, writing: bool, expected: int
) -> None:
    """Past the end is EINVAL for a read and ENOSPC for a write (as the NBD spec has it)."""
    assert nbd_error(exc, writing=writing) == expected

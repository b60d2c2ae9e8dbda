"""tierdisk.client.tune (client/tune.py): process-wide tuning, glibc malloc settings and
uvloop."""

from __future__ import annotations

import asyncio
import sys

from tierdisk.client.tune import install_uvloop, tune_malloc


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected
    assert tune_malloc() is expected  # idempotent


def test_install_uvloop_sets_the_policy_when_available() -> None:
    before = asyncio.get_event_loop_policy()
    try:
        installed = install_uvloop()
        try:
            import uvloop  # noqa: F401
        except ImportError:
            assert installed is False
        else:
            assert installed is True
            assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(before)

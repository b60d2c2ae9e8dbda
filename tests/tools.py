"""External tools for tests: skip when one is missing, or fail when CI requires them.

    from tools import require_tool
    promtool = require_tool("promtool")

`.ci/run` installs the tools and sets TIERDISK_REQUIRE_TOOLS=1, which turns every such skip
into a failure, so CI can never pass by skipping.

Also limits of the test process itself: :func:`file_size_limit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
from collections.abc import Iterator

import pytest

REQUIRE_TOOLS_ENV = "TIERDISK_REQUIRE_TOOLS"

# Debian package that ships each tool, for the message.
DEBIAN_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "docker-compose": "docker-compose",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbdcopy": "libnbd-bin",
    "nbdinfo": "libnbd-bin",
    "nbdkit": "nbdkit",
    "openssl": "openssl",
}


def require_tool(name: str) -> str:
    """The path of `name` on PATH; skip the test if it is missing, or fail it when
    TIERDISK_REQUIRE_TOOLS=1."""
    path = shutil.which(name)
    if path is not None:
        return path
    package = DEBIAN_PACKAGES.get(name)
    reason = f"{name} not found on PATH" + (f" (apt-get install {package})" if package else "")
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_TOOLS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Files of this process cannot grow past ``nbytes`` (``RLIMIT_FSIZE``): ``ftruncate``
    beyond it fails with ``EFBIG``. ``SIGXFSZ``, which the kernel sends too and which would
    end the process, is ignored meanwhile. Both are restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


TOOL_TIMEOUT = 60.0
"""Seconds a tool run by :func:`run_tool` may take before it is killed."""


async def run_tool(*cmd: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a tool (a client: ``nbdinfo``, ``qemu-img``, …); (exit code, stdout, stderr).
    Killed by its PID, and an :class:`AssertionError`, if it takes over :data:`TOOL_TIMEOUT`."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"{cmd[0]} (pid {proc.pid}) did not finish in {TOOL_TIMEOUT} s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def run_tool_ok(*cmd: str, env: dict[str, str] | None = None) -> str:
    """:func:`run_tool`, asserting exit status 0 (the message has both outputs); stdout."""
    code, out, err = await run_tool(*cmd, env=env)
    assert code == 0, f"{' '.join(cmd)} exited {code}\nstdout: {out}\nstderr: {err}"
    return out

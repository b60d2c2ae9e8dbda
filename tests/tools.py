"""External tools for tests: skip when one is missing, or fail when CI requires them.

    from tools import require_tool
    promtool = require_tool("promtool")

`.ci/run` installs the tools and sets TIERDISK_REQUIRE_TOOLS=1, which turns every such skip
into a failure, so CI can never pass by skipping.

Also limits of the test process itself: :func:`file_size_limit`.
"""

from __future__ import annotations

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

"""``python -m tierdisk.client``: the ``tierdisk`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m tierdisk.service ARGS`` is ``tierdisk serve ARGS``."""

import sys

from .main import main

sys.exit(main(sys.argv[1:]))

"""``python -m rf_callback``: the same command line as ``rf-callback``."""

import sys

from rf_callback.cli import main

sys.exit(main())

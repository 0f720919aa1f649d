"""``python -m cio_sync``: the cio-sync command line."""

import sys

from cio_sync.cli import main

sys.exit(main())

"""``python -m clients``: the client CLI without the server installed."""

import sys

from clients.cli import main

sys.exit(main())

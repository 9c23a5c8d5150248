"""``python -m drrfarm``: the ``drrfarm`` command line."""

import sys

from drrfarm.cli import main

sys.exit(main())

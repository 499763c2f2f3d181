"""`python -m clients.cli ...`: the same as the `kpisettle` console script."""

import sys

from .main import main

sys.exit(main())

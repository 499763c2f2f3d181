"""`python -m server`: run the kpisettle gRPC service (see `--help`)."""

import sys

from server.app import main

sys.exit(main())

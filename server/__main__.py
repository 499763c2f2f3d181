"""`python -m server`: run the kpisettle gRPC service (see `--help`)."""

import sys

from server.app import main

if __name__ == "__main__":  # not when a spawned worker process imports the main module
    sys.exit(main())

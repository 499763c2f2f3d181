"""The `kpisettle` command line over the client library: `main(argv)` returns the exit code.

Modules: `main` (argparse and the commands), `inputs` (settle input from JSON and flags),
`validate` (offline ruleset validation), `views` (values as reports) and `output` (table,
JSON and CSV, decimals as exact strings).
"""

from .main import main

__all__ = ["main"]

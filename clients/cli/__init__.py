"""The `kpisettle` command line over the client library: `main(argv)` returns the exit code.

Modules: `main` (argparse and the commands), `inputs` (settle input from JSON and flags),
`batch` (`settle --batch`: files through SettleBatch, results, summary, progress bar),
`export` (billing's `export lines|deltas`), `validate` (offline ruleset validation),
`views` (values as reports) and `output` (rich tables, JSON and CSV, decimals as exact
strings).
"""

from .main import main

__all__ = ["main"]

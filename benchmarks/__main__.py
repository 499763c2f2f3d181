"""`make bench`: every benchmark, one table."""

from benchmarks.engine_bench import main

raise SystemExit(main())

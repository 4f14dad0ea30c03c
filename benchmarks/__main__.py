"""``python -m benchmarks``: every benchmark, one table (see benchmarks/README.md)."""

import sys

from benchmarks._runner import main

sys.exit(main())

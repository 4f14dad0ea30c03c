"""``python -m resilient``: the ``resilient`` command."""

from __future__ import annotations

from resilient.cli import main

raise SystemExit(main())

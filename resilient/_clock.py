"""
The one seam for time: every sleep and every monotonic reading of the retry
loop goes through this module, so tests (and ``resilient.testing``) can swap it.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["asleep", "monotonic", "sleep"]

monotonic = time.monotonic
sleep = time.sleep
asleep = asyncio.sleep

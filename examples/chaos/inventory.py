"""
The service under test in examples/chaos/experiment.yaml: a stock look-up that
answers in about 20 ms, guarded by the policy ``inventory`` of resilience.yaml.
"""

import asyncio

from resilient import resilient


@resilient(policy="inventory")
async def check_stock() -> int:
    """Pretend to ask the inventory database how many items are left."""
    await asyncio.sleep(0.02)
    return 7

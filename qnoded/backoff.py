"""Jittered, capped exponential backoff for the reconnect loops (peer link, MQTT, monitor).

The wait before attempt ``n`` is uniform in ``[0, min(cap, base * 1.5**n))`` ("full
jitter"): nodes that lost one broker or peer at the same moment do not come back in
step, and the cap bounds how long a service that has returned goes unnoticed.  Each
loop sets its own base and cap.
"""

from __future__ import annotations

import random


def backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 for the first retry)."""
    return random.uniform(0, min(cap_s, base_s * 1.5 ** min(attempt, 50)))

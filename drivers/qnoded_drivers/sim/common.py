"""What the simulated drivers of one node share: the link and the detector table."""

from __future__ import annotations

from typing import Any

from qnoded.contracts import DriverContext
from qnoded_drivers.sim.link import LinkParams, SimulatedLink

LINK_KEY = "sim-link"
DETECTORS_KEY = "sim-detectors"


def shared_link(context: DriverContext) -> SimulatedLink:
    """The node's one simulated link, built from ``[simulation]`` on first use."""
    link = context.shared.get(LINK_KEY)
    if link is None:
        if context.simulation is None:
            raise ValueError("simulated drivers need a [simulation] table in the config")
        link = SimulatedLink(
            LinkParams.from_mapping(context.simulation), context.protocol, context.role
        )
        context.shared[LINK_KEY] = link
    assert isinstance(link, SimulatedLink)
    return link


def detector_table(context: DriverContext) -> dict[int, Any]:
    """Simulated detectors of this node by tagger channel."""
    table = context.shared.setdefault(DETECTORS_KEY, {})
    assert isinstance(table, dict)
    return table

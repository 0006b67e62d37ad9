"""Shortest-remaining-prefill-first batching.

As EDF (`policies.edf`: running decodes first, then prefill chunks in priority order over
running prefills and waiting requests), with the priority being the prompt tokens a request
still has to compute. Short prompts overtake long ones; QoS tiers play no part.
"""

from __future__ import annotations

from policies.edf import PriorityBatching
from sim.request import Request


class SRPF(PriorityBatching):
    """Fewest remaining prompt tokens first (ties: arrival order)."""

    def key(self, req: Request) -> tuple:
        return (req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens, req.arrival_s, req.request_id)

"""Lifeguard's Local Health Multiplier (LHM).

A node that misses acks may be the slow one, not its targets.  Lifeguard
(Dadgar et al., 2018, section IV-A) keeps a saturating score that grows on
failed probes, missed nacks and refutations, and shrinks on successful probes;
the node stretches its own probe interval and timeout by (score + 1), so a
starved node stops accusing healthy peers.
"""

from __future__ import annotations


class Awareness:
    def __init__(self, max_multiplier: int) -> None:
        self.max = max(1, max_multiplier)
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(self.max - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)

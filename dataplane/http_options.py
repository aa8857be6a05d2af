"""How an upstream of an ``http`` service treats each request: its timeout and its retries.

Defaults follow Envoy and Linkerd, which users of a mesh already know: a
15 s request timeout (Envoy's route timeout), retries on 502, 503 and 504
(Envoy's ``retriable-status-codes`` users most often set; Linkerd retries
5xx for idempotent routes), at most two retries per request (Envoy's
``num_retries`` default is one; Linkerd's budget, not a count, is the real
cap), and a retry budget of 20% plus 10 a second (dataplane.retry_budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from dataplane.retry_budget import BudgetConfig

DEFAULT_TIMEOUT: Final = 15.0
DEFAULT_RETRY_ON: Final = (502, 503, 504)
DEFAULT_MAX_RETRIES: Final = 2
MAX_RETRIES_LIMIT: Final = 10


@dataclass(frozen=True)
class HttpOptions:
    #: From the end of the request to the end of the response; 0 turns it off.
    timeout: float = DEFAULT_TIMEOUT
    #: Instance answers that are retried (when the request allows it).
    retry_on: tuple[int, ...] = DEFAULT_RETRY_ON
    #: Attempts after the first, per request (connect failures included).
    max_retries: int = DEFAULT_MAX_RETRIES
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if self.timeout < 0:
            raise ValueError("timeout must be >= 0 (0: off)")
        if not all(500 <= s <= 599 for s in self.retry_on):
            raise ValueError("retry_on holds 5xx status codes only")
        if not 0 <= self.max_retries <= MAX_RETRIES_LIMIT:
            raise ValueError(f"max_retries must be from 0 to {MAX_RETRIES_LIMIT}")

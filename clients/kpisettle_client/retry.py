"""Which failed calls are retried, and how long to wait between attempts.

Retried, up to `retries` times with exponential backoff and jitter (0.1 s, 0.2 s, 0.4 s, …
capped at 5 s; each wait drawn between half and all of that), on UNAVAILABLE and
DEADLINE_EXCEEDED:

- `settle` (and every `settle_batch` item still unanswered when a stream fails): the retry
  carries the SAME request_id, so a request the service did store before the failure is
  answered with the stored decision (`deduplicated=True`), never settled twice;
- `simulate` and `validate_ruleset`, which store nothing;
- every read: get, list (each page), breakdown, explain, replay, verify, diff, impact.

Not retried on those codes: `create_ruleset_version`, `approve` and `retire`. They carry no
request id, so after a lost answer a retry could store a second draft or fail on a
transition the first attempt made. They are retried only when the service says it refused
the call before running it (UNAVAILABLE with reason SHUTTING_DOWN, sent while a server
drains). Each attempt gets the whole per-call timeout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import KpisettleError, from_rpc_error

T = TypeVar("T")

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: ErrorInfo reasons that prove the service did not run the call.
NOT_RUN_REASONS = frozenset({"SHUTTING_DOWN"})


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must not be negative")

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return random.uniform(ceiling / 2, ceiling)


def retryable(error: KpisettleError, idempotent: bool) -> bool:
    if error.code not in RETRYABLE_CODES:
        return False
    return idempotent or (error.code == grpc.StatusCode.UNAVAILABLE and error.reason in NOT_RUN_REASONS)


def call_with_retry(attempt: Callable[[], T], policy: RetryPolicy, *, idempotent: bool, sleep: Callable[[float], None] = time.sleep) -> T:
    """`attempt()` until it succeeds, fails for good, or the retries are spent; failures raise KpisettleError."""
    tries = 0
    while True:
        try:
            return attempt()
        except grpc.RpcError as failure:
            error = from_rpc_error(failure)
            if tries >= policy.retries or not retryable(error, idempotent):
                raise error from failure
        sleep(policy.delay(tries))
        tries += 1


__all__ = ["RETRYABLE_CODES", "RetryPolicy", "call_with_retry", "retryable"]

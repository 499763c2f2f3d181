"""Stable request ids: the same settlement request always gets the same id.

`derive_request_id` is what `settle` and `settle_batch` use when the caller gives no
request_id:

    "{contract_id}/{period_start:YYYY-MM-DD}/{first 32 hex digits of SHA-256(payload)}"

where the payload is canonical JSON (sorted keys, no spaces, UTF-8) of every field of the
input exactly as sent (amounts as their decimal text) and of `expected_revision`. The
contract id is cut to 84 characters so that the id stays within the service's 128; the
digest covers the whole input either way.

So re-sending the same input settles nothing twice (the service answers with the stored
decision, `deduplicated=True`), while an input with any changed value is a new request
and, for an already settled contract period, stores the next revision. One consequence to
know: changing an input back to exactly what an earlier revision was given is the same
request as that earlier one and returns the earlier decision; pass an explicit
`request_id` to store a new revision in that case.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kpisettle.v1 import resources_pb2 as pb

MAX_REQUEST_ID = 128
DIGEST_CHARS = 32
MAX_CONTRACT_PART = MAX_REQUEST_ID - DIGEST_CHARS - len("/YYYY-MM-DD/")


def _date(message: Any, present: bool) -> str | None:
    return f"{message.year:04}-{message.month:02}-{message.day:02}" if present else None


def canonical_payload(message: pb.SettlementInput, expected_revision: int | None = None) -> bytes:
    """The bytes hashed into a derived request id."""
    data = {
        "contract_id": message.contract_id,
        "seller_id": message.seller_id,
        "market": message.market,
        "period_start_date": _date(message.period_start_date, message.HasField("period_start_date")),
        "period_end_date": _date(message.period_end_date, message.HasField("period_end_date")),
        "ruleset": message.ruleset,
        "metrics": {name: {"value": m.value, "currency_code": m.currency_code} for name, m in message.metrics.items()},
        "params": dict(message.params),
        "fx_rates": [
            {
                "base_currency_code": r.base_currency_code,
                "quote_currency_code": r.quote_currency_code,
                "rate": r.rate,
                "source": r.source,
                "as_of_date": _date(r.as_of_date, r.HasField("as_of_date")),
            }
            for r in message.fx_rates
        ],
        "active_days": message.active_days if message.HasField("active_days") else None,
        "expected_revision": expected_revision,
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def derive_request_id(message: pb.SettlementInput, expected_revision: int | None = None) -> str:
    """The stable request id of this input (and expected revision); see the module's documentation."""
    digest = hashlib.sha256(canonical_payload(message, expected_revision)).hexdigest()[:DIGEST_CHARS]
    period = _date(message.period_start_date, True)
    return f"{message.contract_id[:MAX_CONTRACT_PART]}/{period}/{digest}"


__all__ = ["canonical_payload", "derive_request_id"]

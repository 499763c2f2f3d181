"""`settle_batch`: many items over one SettleBatch stream, with a bound on unanswered items.

The caller's iterable is read lazily, by the thread gRPC uses to send requests, and only
while fewer than `max_in_flight` items are outstanding (read from the iterable but not yet
handed back as a result); a month of a million contract periods therefore never sits in
memory. Items go out `items_per_message` at a time (a partial message is sent when the
bound or the end of the iterable is reached, so the stream never waits on itself).

The service answers in order, each item with its settlement or its own status; a bad item
never ends the stream. When the stream itself fails with UNAVAILABLE or DEADLINE_EXCEEDED,
a new stream re-sends every unanswered item with the SAME request_id (items the service had
stored come back `deduplicated`), up to `retries` failures in a row without an answer in
between. An exception raised by the caller's iterable ends the input: the items already
read are still answered and yielded, then the exception is raised.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from kpisettle.v1 import settlement_service_pb2 as ss

from . import convert
from .errors import Internal, KpisettleError, Unavailable, from_rpc_error, from_status
from .models import BatchResult, SettlementInput
from .request_ids import derive_request_id
from .retry import RetryPolicy, retryable

#: The service's limit on items in one message.
MAX_ITEMS_PER_MESSAGE = 1000


@dataclass(frozen=True)
class BatchItem:
    """A batch item with an explicit request_id and/or expected_revision (both optional)."""

    input: SettlementInput
    request_id: str | None = None
    expected_revision: int | None = None


#: What settle_batch accepts per item: an input (request id derived), (request_id, input), or a BatchItem.
BatchInput = SettlementInput | tuple[str, SettlementInput] | BatchItem


class ResponseStream(Protocol):
    """What a SettleBatch call returns: the responses, and a way to stop."""

    def __iter__(self) -> Iterator[ss.SettleBatchResponse]: ...

    def cancel(self) -> bool: ...


@dataclass
class _Item:
    index: int
    request_id: str
    input: SettlementInput
    message: ss.SettleBatchItem


def _item(raw: object, index: int) -> _Item:
    if isinstance(raw, BatchItem):
        value, request_id, expected = raw.input, raw.request_id, raw.expected_revision
    elif isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], str):
        request_id, value = raw
        expected = None
    else:
        value, request_id, expected = raw, None, None  # type: ignore[assignment]
    if not isinstance(value, SettlementInput):
        raise TypeError(
            f"batch item {index} is a {type(raw).__name__}; expected SettlementInput, (request_id, SettlementInput) or BatchItem"
        )
    message = convert.input_message(value)
    request_id = request_id or derive_request_id(message, expected)
    item = ss.SettleBatchItem(request_id=request_id, input=message)
    if expected is not None:
        item.expected_revision = expected
    return _Item(index, request_id, value, item)


class BatchRun:
    """One settle_batch: iterate it for the results, in the order of the inputs."""

    def __init__(
        self,
        open_stream: Callable[[Iterator[ss.SettleBatchRequest]], ResponseStream],
        inputs: Iterable[BatchInput],
        *,
        items_per_message: int = 100,
        max_in_flight: int = 1000,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= items_per_message <= MAX_ITEMS_PER_MESSAGE:
            raise ValueError(f"items_per_message must be between 1 and {MAX_ITEMS_PER_MESSAGE}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._open = open_stream
        self._source = iter(inputs)
        self._per_message = items_per_message
        self._max = max_in_flight
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._cv = threading.Condition()
        self._pull_lock = threading.Lock()  # one reader of the caller's iterable at a time
        # Under _cv:
        self._pending: deque[_Item] = deque()  # read and not answered, in order; the first _sent are sent
        self._sent = 0
        self._outstanding = 0  # read and not yet handed back to the caller
        self._next_index = 0
        self._generation = 0  # which stream the request generators feed
        self._exhausted = False
        self._source_error: BaseException | None = None
        self._closed = False

    # -------------------------------------------------------------- the sending side

    def _requests(self, generation: int) -> Iterator[ss.SettleBatchRequest]:
        """The request messages of one stream; gRPC iterates this on its own thread."""
        while True:
            chunk: list[ss.SettleBatchItem] | None = None
            with self._cv:
                while True:
                    if self._closed or self._generation != generation:
                        return
                    unsent = len(self._pending) - self._sent
                    if unsent >= self._per_message or (unsent and (self._exhausted or self._outstanding >= self._max)):
                        take = min(unsent, self._per_message)
                        chunk = [item.message for item in itertools.islice(self._pending, self._sent, self._sent + take)]
                        self._sent += take
                        break
                    if self._exhausted:
                        return  # everything is sent: half-close
                    if self._outstanding < self._max:
                        break  # room for one more item
                    self._cv.wait()
            if chunk is not None:
                yield ss.SettleBatchRequest(items=chunk)
            else:
                self._pull(generation)

    def _pull(self, generation: int) -> None:
        with self._pull_lock:
            with self._cv:
                if self._closed or self._exhausted or self._generation != generation:
                    return
                index = self._next_index
            try:
                item = _item(next(self._source), index)
            except StopIteration:
                with self._cv:
                    self._exhausted = True
                    self._cv.notify_all()
                return
            except Exception as error:  # the caller's iterable failed: answer what was read, then raise it
                with self._cv:
                    self._source_error = error
                    self._exhausted = True
                    self._cv.notify_all()
                return
            with self._cv:
                self._pending.append(item)
                self._outstanding += 1
                self._next_index += 1

    # -------------------------------------------------------------- the receiving side

    def _answered(self, result: ss.SettleBatchResult) -> _Item:
        with self._cv:
            if not self._sent:
                raise Internal(f"the service answered request_id {result.request_id!r}, which was not sent", reason="UNEXPECTED_RESULT")
            item = self._pending.popleft()
            self._sent -= 1
        if result.request_id != item.request_id:
            raise Internal(
                f"the service answered request_id {result.request_id!r} where {item.request_id!r} was expected",
                reason="UNEXPECTED_RESULT",
            )
        return item

    def _release(self) -> None:
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()

    @staticmethod
    def _result(item: _Item, result: ss.SettleBatchResult) -> BatchResult:
        if result.WhichOneof("result") == "settlement":
            settled = convert.settlement(result.settlement, result.deduplicated)
            return BatchResult(item.index, item.request_id, item.input, settlement=settled)
        return BatchResult(item.index, item.request_id, item.input, error=from_status(result.error))

    def __iter__(self) -> Generator[BatchResult, None, None]:
        failures = 0
        stream: ResponseStream | None = None
        try:
            while True:
                with self._cv:
                    generation = self._generation
                stream = self._open(self._requests(generation))
                try:
                    for response in stream:
                        for result in response.results:
                            item = self._answered(result)
                            failures = 0
                            try:
                                yield self._result(item, result)
                            finally:
                                self._release()
                    with self._cv:  # the service ends the stream only after the last item went out
                        unanswered, source_error, early = len(self._pending), self._source_error, not self._exhausted
                    if unanswered or early:
                        raise _StreamEnded(unanswered)
                except grpc.RpcError as failure:
                    error: KpisettleError = from_rpc_error(failure)
                except _StreamEnded as ended:
                    error = Unavailable(f"the stream ended early ({ended.unanswered} items unanswered)", reason="STREAM_ENDED")
                else:
                    if source_error is not None:
                        raise source_error
                    return
                if failures >= self._policy.retries or not retryable(error, idempotent=True):
                    raise error
                stream.cancel()
                with self._cv:  # a new stream: every unanswered item goes again, with its request_id
                    self._generation += 1
                    self._sent = 0
                    self._cv.notify_all()
                self._sleep(self._policy.delay(failures))
                failures += 1
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            if stream is not None:
                stream.cancel()


class _StreamEnded(Exception):
    def __init__(self, unanswered: int) -> None:
        super().__init__(unanswered)
        self.unanswered = unanswered


__all__ = ["MAX_ITEMS_PER_MESSAGE", "BatchInput", "BatchItem", "BatchRun", "ResponseStream"]

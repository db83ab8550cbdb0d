"""Ingest metrics, measured around each gRPC Push call (a server interceptor).

The interceptor times each call from the moment the handler starts to its answer
(which comes after the batch's commit), counts the acks of the answer by outcome and
rejected records by reason, and counts calls by gRPC status code, refusals included.
It reads what the ingest service answered and changes nothing: the counts the service
gives with its answer (:data:`ANSWERED`, set in the call's own context), or else the
acks themselves (reading a thousand acks costs about 0.2 ms).

This module imports ``grpc``: import it only where gRPC is set up (after
:func:`common.tls.restrict_grpc_to_tls13`), never from the REST API.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from collector.metrics import Metrics, reject_reason
from common.proto import meterd_pb2 as pb

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


@dataclass(frozen=True, slots=True)
class Answered:
    """How many acks of an answer say each outcome, and the rejected ones' reasons."""

    accepted: int
    duplicate: int
    rejected: int
    reasons: tuple[str, ...] = ()


# Set by the handler just before it answers: the call's task runs the handler inside
# the interceptor's ``await``, so the interceptor reads it back once the handler returns.
ANSWERED: ContextVar[Answered | None] = ContextVar("meterd_answered", default=None)


class IngestMetricsInterceptor(_Interceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        inner: Handler | None = getattr(handler, "unary_unary", None)
        if inner is None:
            return handler
        metrics = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            answered = ANSWERED.set(None)
            try:
                response = await inner(request, context)
            except BaseException:
                code = context.code()
                metrics.calls.labels(code.name if code is not None else "UNKNOWN").inc()
                raise
            else:
                metrics.ack_latency.observe(time.perf_counter() - started)
                metrics.calls.labels("OK").inc()
                counts = ANSWERED.get()
                if counts is not None:
                    observe_answer(metrics, counts)
                elif isinstance(response, pb.PushResponse):
                    observe_acks(metrics, response)
                return response
            finally:
                ANSWERED.reset(answered)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def observe_answer(metrics: Metrics, answer: Answered) -> None:
    metrics.count_records("grpc", {
        "accepted": answer.accepted, "duplicate": answer.duplicate, "rejected": answer.rejected
    })
    if answer.reasons:
        metrics.count_rejects("grpc", [reject_reason(r) for r in answer.reasons])


def observe_acks(metrics: Metrics, response: pb.PushResponse) -> None:
    acks = response.acks
    codes = [ack.outcome for ack in acks]
    accepted, duplicate = codes.count(pb.ACCEPTED), codes.count(pb.DUPLICATE)
    other = len(codes) - accepted - duplicate  # rejected (or an outcome left unset)
    metrics.count_records(
        "grpc", {"accepted": accepted, "duplicate": duplicate, "rejected": other}
    )
    if other:
        metrics.count_rejects(
            "grpc", [reject_reason(ack.reason) for ack in acks if ack.outcome == pb.REJECTED]
        )

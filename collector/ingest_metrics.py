"""Ingest metrics, measured around each gRPC Push call (a server interceptor).

The interceptor times each call from the moment the handler starts to its answer
(which comes after the batch's commit), counts the acks of the answer by outcome and
rejected records by reason, and counts calls by gRPC status code, refusals included.
It reads what the ingest service answered and changes nothing.

This module imports ``grpc``: import it only where gRPC is set up (after
:func:`common.tls.restrict_grpc_to_tls13`), never from the REST API.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from collector.metrics import Metrics, reject_reason
from common.proto import meterd_pb2 as pb

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


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
            try:
                response = await inner(request, context)
            except BaseException:
                code = context.code()
                metrics.calls.labels(code.name if code is not None else "UNKNOWN").inc()
                raise
            metrics.ack_latency.observe(time.perf_counter() - started)
            metrics.calls.labels("OK").inc()
            if isinstance(response, pb.PushResponse):
                observe_acks(metrics, response)
            return response

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


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

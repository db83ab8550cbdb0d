"""The delivery worker: outbox events to subscribed endpoints, at least once, in order.

The collector daemon owns one worker as a background task. Every poll interval it:

1. **fans out**: reads each shard's outbox past the lowest subscription cursor and
   queues a delivery per subscription whose filter takes the event
   (:meth:`WebhookState.fan_out`);
2. **sends**: for each enabled subscription whose lowest pending delivery is due,
   starts one sender task (at most one per subscription, at most ``concurrency``
   requests in flight). A sender leases the subscription, sends its deliveries one at
   a time in sequence order, and records each outcome, until none is due.

A delivery is acknowledged by any 2xx answer within ``timeout_seconds``. Anything else
(another status, a refused connection, a timeout) is a failed try: the next one waits
a random time between 0 and ``min(cap, base * 2 ** (tries - 1))`` seconds (exponential
backoff with full jitter; at least what a ``Retry-After`` header of a 429 or 503 asks,
up to the cap), and after ``max_attempts`` tries the delivery is dead (a dead letter)
and the subscription goes on with the next one. Dead letters stay until replayed.

At least once: a delivery whose 2xx was lost (a timeout after the receiver processed
it, a collector killed between sending and recording) is sent again, with the same
``webhook-id``. Ordering: a subscription's delivery ``n + 1`` is sent only once ``n``
is delivered or dead. A lease (``timeout * 2 + 30`` seconds, renewed when half of it
is left) keeps two collectors from sending to one subscription at once; one that
stopped cleanly gives its leases back, one that was killed loses them when they expire.

Nothing here runs inside an ingest transaction and no transaction is held across an
HTTP request: the worker's units of work are short reads and writes, so a slow or
dead receiver costs the ingest path nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from collector.config import WebhooksConfig
from collector.ledger.service import ShardedLedger
from collector.ledger.store import LedgerStore
from collector.webhooks.secretbox import SecretBox
from collector.webhooks.signing import signed_headers
from collector.webhooks.state import DEAD, Claim, WebhookState, outbox_after, outbox_position
from common import logs
from common.cli import meterd_version
from common.errors import MeterdError
from common.ids import new_id

log = logs.get("webhooks")

FAN_OUT_BATCH = 500
RESPONSE_BYTES_READ = 4096
PRUNE_EVERY_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Attempt:
    ok: bool
    http_status: int = 0  # 0: no answer
    error: str = ""
    retry_after_s: float = 0.0


def backoff_seconds(tries: int, base: Decimal, cap: Decimal) -> float:
    """Full-jitter exponential backoff after ``tries`` failed tries (tenacity's
    ``wait_random_exponential``, used outside a retry loop: the schedule is stored with
    the delivery, so it survives restarts and is shared by every collector)."""
    wait = wait_random_exponential(multiplier=float(base), max=float(cap))
    state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(tries, 1)
    return float(wait(state))


def now_us() -> int:
    return time.time_ns() // 1000


class DeliveryWorker:
    def __init__(
        self,
        ledger: ShardedLedger,
        settings: WebhooksConfig,
        secrets: Callable[[], SecretBox],
    ) -> None:
        """``secrets`` opens the secret key file; it is called when a secret is first
        needed (a collector without subscriptions needs no key file)."""
        self.ledger = ledger
        self.settings = settings
        self.owner = new_id()  # this worker's lease identity
        self._secrets = secrets
        self._box: SecretBox | None = None
        self._state: WebhookState | None = None
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        timeout = float(settings.timeout_seconds)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._lease_us = int((timeout * 2 + 30) * 1_000_000)

    # lifecycle

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="webhook-delivery")
        return self._task

    async def stop(self) -> None:
        """Cancel the worker and wait for it: senders stop, leases are given back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def settle(self) -> None:
        """Wait for the senders started so far to run out of due deliveries."""
        while self._senders:
            await asyncio.gather(*self._senders.values(), return_exceptions=True)

    def wake(self) -> None:
        """Poll now instead of at the end of the interval (after a replay, say)."""
        self._wake.set()

    async def run(self) -> None:
        interval = float(self.settings.poll_interval_seconds)
        connector = aiohttp.TCPConnector(limit=self.settings.concurrency)
        async with aiohttp.ClientSession(
            connector=connector,
            headers={"user-agent": f"meterd-webhooks/{meterd_version()}"},
        ) as session:
            try:
                while True:
                    try:
                        await self.poll(session)
                    except MeterdError as exc:  # a store unavailable, say: next poll
                        log.warning("webhook_poll_failed", error=str(exc))
                    except Exception:  # the worker outlives any failed round, logged
                        log.exception("webhook_poll_failed")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), interval)
                    self._wake.clear()
            finally:
                await self._shutdown()

    async def _shutdown(self) -> None:
        senders = list(self._senders.values())
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        if self._state is not None:
            try:
                await asyncio.shield(self._state.release(self.owner))
            except (MeterdError, asyncio.CancelledError) as exc:
                log.warning("webhook_leases_kept", error=str(exc) or type(exc).__name__)

    # one round

    async def state(self) -> WebhookState:
        if self._state is None:
            self._state = await WebhookState.open(self.ledger.control)
        return self._state

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Fan out what the outboxes hold, then start senders for what is due."""
        state = await self.state()
        for store in self.ledger.stores:
            await self.fan_out(state, store)
        for sub_id in await state.due(now_us(), self.owner):
            if sub_id not in self._senders:
                task = asyncio.create_task(self._send_all(session, state, sub_id))
                self._senders[sub_id] = task
                task.add_done_callback(self._sender_done)
        if time.monotonic() - self._last_prune > PRUNE_EVERY_SECONDS:
            self._last_prune = time.monotonic()
            keep_us = self.settings.keep_delivered_days * 86_400_000_000
            pruned = await state.prune_delivered(now_us() - keep_us)
            if pruned:
                log.info("webhook_deliveries_pruned", deliveries=pruned)

    async def fan_out(self, state: WebhookState, store: LedgerStore) -> None:
        """Queue the events of one shard's outbox that some subscription has not seen."""
        source, head = await outbox_position(store)
        while True:
            floor = await state.cursor_floor(source)
            if floor is None or floor >= head:
                return
            events = await outbox_after(store, floor, FAN_OUT_BATCH)
            if not events:
                return
            queued = await state.fan_out(source, events, now_us())
            if queued:
                log.info("webhook_events_queued", source=source, deliveries=queued,
                         through_seq=events[-1].seq)
            if len(events) < FAN_OUT_BATCH:
                return

    # sending

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        for sub_id, running in list(self._senders.items()):
            if running is task:
                del self._senders[sub_id]

    async def _send_all(
        self, session: aiohttp.ClientSession, state: WebhookState, sub_id: str
    ) -> None:
        try:
            while True:
                # The slot first, then the lease: a lease never waits for a free slot, so
                # it only has to outlast one request (the lease is twice the timeout).
                async with self._slots:
                    start = now_us()
                    claim = await state.claim(sub_id, self.owner, start, start + self._lease_us)
                    if claim is None:
                        return
                    attempt = await self._attempt(session, claim)
                await self._record(state, claim, attempt)
        except MeterdError as exc:  # a store unavailable, say: the next poll starts over
            log.warning("webhook_sender_failed", subscription=sub_id, error=str(exc))
        except Exception:  # one subscription's failure stops no other; logged
            log.exception("webhook_sender_failed", subscription=sub_id)

    async def _attempt(self, session: aiohttp.ClientSession, claim: Claim) -> Attempt:
        d = claim.delivery
        try:
            if self._box is None:
                self._box = self._secrets()
            secret = self._box.unseal(d.subscription_id, claim.sealed_secret)
        except MeterdError as exc:
            log.error("webhook_secret_unavailable", subscription=d.subscription_id,
                      error=str(exc))
            return Attempt(False, 0, f"secret unavailable: {exc}")
        body = d.body.encode()
        headers = {
            "content-type": "application/json",
            **signed_headers(secret, d.event_id, int(time.time()), body),
        }
        try:
            async with session.post(
                claim.url, data=body, headers=headers, allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                await response.content.read(RESPONSE_BYTES_READ)
                if 200 <= response.status < 300:
                    return Attempt(True, response.status)
                return Attempt(
                    False, response.status, f"HTTP {response.status} {response.reason or ''}"
                    .strip(), _retry_after(response),
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Attempt(False, 0, f"{type(exc).__name__}: {exc}".rstrip(": "))

    async def _record(self, state: WebhookState, claim: Claim, attempt: Attempt) -> None:
        d = claim.delivery
        at = now_us()
        context = {"subscription": d.subscription_id, "event_id": d.event_id,
                   "event_type": d.event_type, "seq": d.seq, "attempt": d.attempts + 1}
        if attempt.ok:
            await state.delivered(d.subscription_id, d.seq, at, attempt.http_status)
            log.info("webhook_delivered", status=attempt.http_status, **context)
            return
        s = self.settings
        wait = backoff_seconds(d.attempts + 1, s.backoff_base_seconds, s.backoff_cap_seconds)
        wait = max(wait, min(attempt.retry_after_s, float(s.backoff_cap_seconds)))
        status = await state.failed(
            d.subscription_id, d.seq, now_us=at, http_status=attempt.http_status,
            error=attempt.error, retry_at_us=at + int(wait * 1_000_000),
            max_attempts=s.max_attempts,
        )
        if status == DEAD:
            log.error("webhook_dead_lettered", error=attempt.error, **context)
        else:
            log.warning("webhook_attempt_failed", error=attempt.error,
                        retry_in_s=round(wait, 3), **context)


def _retry_after(response: aiohttp.ClientResponse) -> float:
    """Seconds a 429 or 503 answer asks to wait (``Retry-After: <seconds>``), or 0."""
    if response.status not in (429, 503):
        return 0.0
    text = response.headers.get("Retry-After", "").strip()
    return float(int(text)) if text.isdigit() else 0.0

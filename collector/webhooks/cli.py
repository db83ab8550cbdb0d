"""``meterd webhook add|list|enable|disable|remove|deliveries|replay``.

The commands open the ledger named by the collector configuration directly, so they
work whether or not the collector runs; a running collector's worker picks changes up
on its next poll. ``add`` prints the new subscription's secret once: only its sealed
form is stored (see :mod:`collector.webhooks.secretbox`), and it creates the secrets
key file if there is none, so run it as the user the collector runs as. Every change
is recorded in the audit log as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from collector.config import load_collector_config
from collector.ledger.outbox import EVENT_TYPES
from collector.webhooks.service import WebhookService
from collector.webhooks.state import STATUSES, Delivery, SubscriptionSummary
from common.cli import EXIT_OK
from common.records import from_us

DEFAULT_CONFIG = Path("/etc/meterd/collector.toml")
T = TypeVar("T")


def register(subparsers: Any) -> None:
    webhook = subparsers.add_parser("webhook", help="webhook subscriptions and deliveries")
    sub = webhook.add_subparsers(metavar="ACTION", required=True)

    def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], int],
                with_id: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                            help="collector TOML file")
        if with_id:
            parser.add_argument("subscription_id", help="as `meterd webhook list` shows it")
        parser.set_defaults(handler=handler)
        return parser

    add = command("add", "subscribe an endpoint; prints its signing secret once", _add,
                  with_id=False)
    add.add_argument("url", help="https:// endpoint that receives POSTed events")
    add.add_argument("--event", action="append", default=[], metavar="TYPE",
                     help=f"event type, group (invoice.*) or *; repeat for several; none:"
                          f" every type ({', '.join(sorted(EVENT_TYPES))})")
    add.add_argument("--description", default="", help="what the endpoint is for")
    add.add_argument("--disabled", action="store_true",
                     help="create it disabled: events queue, nothing is sent until enabled")
    add.add_argument("--from-start", action="store_true",
                     help="also deliver every event already in the outboxes")
    add.add_argument("--json", action="store_true", help="print the result as JSON")

    listing = command("list", "list subscriptions with their delivery counts", _list,
                      with_id=False)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    command("enable", "send again to a disabled subscription", _enable)
    command("disable", "stop sending (events keep queueing)", _disable)
    command("remove", "delete a subscription and its deliveries, dead letters included",
            _remove)

    deliveries = command("deliveries", "list a subscription's deliveries in sequence order",
                         _deliveries)
    deliveries.add_argument("--status", choices=STATUSES, default=None,
                            help="only deliveries in this state")
    deliveries.add_argument("--after", type=int, default=0, metavar="SEQ",
                            help="start after this sequence number")
    deliveries.add_argument("--limit", type=int, default=100, help="at most this many")
    deliveries.add_argument("--json", action="store_true", help="one JSON object per line")

    replay = command("replay", "send deliveries again, in order, with fresh tries", _replay)
    what = replay.add_mutually_exclusive_group(required=True)
    what.add_argument("--dead", action="store_true", help="every dead letter")
    what.add_argument("--from-sequence", type=int, metavar="SEQ",
                      help="every delivery from this sequence number on")
    what.add_argument("--from-event", metavar="EVENT_ID",
                      help="every delivery from this event's on")


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def _with_service(args: argparse.Namespace, work: Callable[[WebhookService], Awaitable[T]]) -> T:
    from collector.daemon import open_ledger

    cfg = load_collector_config(args.config)

    async def run() -> T:
        ledger = await open_ledger(cfg)
        try:
            service = WebhookService(
                ledger, cfg.raw.webhooks, cfg.path(cfg.raw.webhooks.secrets_key_file)
            )
            return await work(service)
        finally:
            await ledger.close()

    return asyncio.run(run())


def _when(us: int) -> str:
    return from_us(us).isoformat(timespec="seconds").replace("+00:00", "Z") if us else "-"


def _add(args: argparse.Namespace) -> int:
    created = _with_service(args, lambda s: s.create(
        args.url, event_types=args.event, description=args.description,
        enabled=not args.disabled, from_start=args.from_start, actor=cli_actor(),
    ))
    sub = created.subscription
    if args.json:
        print(json.dumps({"id": sub.id, "url": sub.url, "event_types": list(sub.event_types),
                          "enabled": sub.enabled, "description": sub.description,
                          "secret": created.secret}))
        return EXIT_OK
    print(f"subscription {sub.id}")
    print(f"  url:     {sub.url}")
    print(f"  events:  {', '.join(sub.event_types) or 'all'}")
    print(f"  enabled: {'yes' if sub.enabled else 'no'}")
    print(f"  secret:  {created.secret}")
    print("The secret is shown only this once: give it to the receiver now.")
    return EXIT_OK


def _summary_json(s: SubscriptionSummary) -> dict[str, Any]:
    sub = s.subscription
    return {"id": sub.id, "url": sub.url, "description": sub.description,
            "event_types": list(sub.event_types), "enabled": sub.enabled,
            "created": _when(sub.created_us), "pending": s.pending, "delivered": s.delivered,
            "dead": s.dead, "last_delivered": _when(s.last_delivered_us),
            "last_sequence": s.sequences}


def _list(args: argparse.Namespace) -> int:
    summaries = _with_service(args, lambda s: s.subscriptions())
    if args.json:
        for s in summaries:
            print(json.dumps(_summary_json(s)))
        return EXIT_OK
    if not summaries:
        print("no webhook subscriptions")
    for s in summaries:
        sub = s.subscription
        state = "enabled" if sub.enabled else "disabled"
        print(f"{sub.id}  {state:8}  {sub.url}  events: {', '.join(sub.event_types) or 'all'}")
        print(f"    pending {s.pending}, delivered {s.delivered}, dead {s.dead};"
              f" last delivered {_when(s.last_delivered_us)}")
    return EXIT_OK


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    sub = _with_service(args, lambda s: s.set_enabled(
        args.subscription_id, enabled, actor=cli_actor()
    ))
    print(f"subscription {sub.id} {'enabled' if sub.enabled else 'disabled'}")
    return EXIT_OK


def _enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


def _disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def _remove(args: argparse.Namespace) -> int:
    _with_service(args, lambda s: s.remove(args.subscription_id, actor=cli_actor()))
    print(f"subscription {args.subscription_id} removed")
    return EXIT_OK


def _delivery_json(d: Delivery) -> dict[str, Any]:
    return {"sequence": d.seq, "event_id": d.event_id, "event_type": d.event_type,
            "account_id": d.account_id, "status": d.status, "attempts": d.attempts,
            "next_attempt": _when(d.next_attempt_us) if d.status == "pending" else "-",
            "last_attempt": _when(d.last_attempt_us), "last_status": d.last_status,
            "last_error": d.last_error, "delivered": _when(d.delivered_us)}


def _deliveries(args: argparse.Namespace) -> int:
    found = _with_service(args, lambda s: s.deliveries(
        args.subscription_id, status=args.status, after_seq=args.after, limit=args.limit
    ))
    for d in found:
        if args.json:
            print(json.dumps(_delivery_json(d)))
            continue
        outcome = {
            "delivered": f"delivered {_when(d.delivered_us)}",
            "pending": f"next try {_when(d.next_attempt_us)}",
            "dead": "dead letter",
        }[d.status]
        last = f"; last: {d.last_error}" if d.last_error else ""
        print(f"{d.seq:>6}  {d.event_type:26} {d.event_id}  {outcome},"
              f" {d.attempts} tries{last}")
    if not found and not args.json:
        print("no deliveries")
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    queued = _with_service(args, lambda s: s.replay(
        args.subscription_id, dead=args.dead, from_sequence=args.from_sequence,
        from_event=args.from_event, actor=cli_actor(),
    ))
    print(f"{queued} deliveries queued again for subscription {args.subscription_id}")
    return EXIT_OK

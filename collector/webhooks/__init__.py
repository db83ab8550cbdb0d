"""Webhooks: outbox events delivered to subscribed HTTP endpoints, signed, at least once.

The parts, from the database to the receiver:

* :mod:`collector.ledger.outbox` (with ``LedgerTx.emit``): events written in the same
  transaction as the change that causes them, one outbox per shard.
* :mod:`collector.webhooks.state`: subscriptions and delivery state on the control shard.
* :mod:`collector.webhooks.secrets`: subscription secrets, encrypted at rest.
* :mod:`collector.webhooks.signing`: the Standard Webhooks signature.
* :mod:`collector.webhooks.worker`: the delivery worker the collector daemon runs.
* :mod:`collector.webhooks.service`: what the CLI and the REST API call.
"""

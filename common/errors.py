"""The meterd error tree.

Every error meterd raises on purpose derives from :class:`MeterdError`. Entry points
(the CLI, the gRPC service, the REST API) translate these into exit codes, gRPC
status codes and problem+json documents in one place each; nothing else catches
them broadly.

::

    MeterdError
    ├── ConfigError            a configuration or input file is wrong (file, key, expectation)
    ├── ValidationError        a value is malformed; permanent, reject with the reason
    │   ├── MoneyError         float money, unknown currency, currencies mixed
    │   └── RecordError        a usage record breaks a rule
    ├── SecurityError          a key, certificate or peer identity is not acceptable
    ├── TransientError         worth retrying: a store or peer is unavailable for now
    │   └── StoreUnavailable   the ledger store cannot be reached
    └── IntegrityError         stored data contradicts an invariant (found by verify)
"""

from __future__ import annotations


class MeterdError(Exception):
    """Root of every error meterd raises on purpose."""


class ConfigError(MeterdError):
    """A configuration or input file is wrong.

    The message names the file, the key path and what was expected.
    """

    def __init__(self, source: str, key: str, expected: str) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {expected}")


class ValidationError(MeterdError):
    """A value is malformed. Permanent: retrying the same value fails the same way."""


class MoneyError(ValidationError):
    """Money used wrongly: a float, an unknown currency, two currencies mixed."""


class RecordError(ValidationError):
    """A usage record breaks a rule; the message is the reason sent to the agent."""


class SecurityError(MeterdError):
    """A key, certificate or peer identity is not acceptable."""


class TransientError(MeterdError):
    """A failure worth retrying later with backoff."""


class StoreUnavailable(TransientError):
    """The ledger store cannot be reached right now."""


class IntegrityError(MeterdError):
    """Stored data contradicts one of the ledger's invariants."""

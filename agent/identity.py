"""The agent's start-up checks of its TLS material, and the host id it speaks for.

:func:`check_identity` refuses a private key that group or others can read, takes the
host id from the agent's own certificate, and makes sure the key belongs to the
certificate and the CA certificate can be loaded (a TLS 1.3 client context is built
from the three files and thrown away). It is the only part of running the agent that
needs ``cryptography``; ``meterd agent run`` calls it before it replaces itself with
the long-running agent process (:mod:`agent.__main__`), which therefore never loads
that library.
"""

from __future__ import annotations

from agent.config import LoadedAgentConfig
from common.pki import check_private_key_file, host_id_from_certificate
from common.tls import client_ssl_context


def check_identity(cfg: LoadedAgentConfig) -> str:
    """The host id of the agent's certificate, once key, certificate and CA check out.

    Raises :class:`~common.errors.SecurityError` or :class:`~common.errors.ConfigError`
    naming the file and what is wrong with it.
    """
    tls = cfg.raw.tls
    key, cert, ca = cfg.path(tls.key), cfg.path(tls.cert), cfg.path(tls.ca)
    check_private_key_file(key)
    host_id = host_id_from_certificate(cert.read_bytes())
    client_ssl_context(ca, cert, key)
    return host_id

"""Fixtures of the reliability suite: the seed every scenario draws from, and PKI.

Each test prints its seed; ``METERD_SEED=<n>`` replays it (kill points, outage
lengths and counter increments all come from it). ``METERD_SOAK=1`` runs the long
mode: more kills, more agents, longer outages.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.reliability.faults import HOSTS


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    given = os.environ.get("METERD_SEED", "")
    value = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"\n{request.node.nodeid}: METERD_SEED={value}")
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture(scope="session")
def rel_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a collector certificate for 127.0.0.1 and agent certificates host-a..host-t."""
    from common import pki

    root = tmp_path_factory.mktemp("rel-pki")
    pki.init_ca(root)
    pki.issue_server(root, "localhost", ip_addresses=["127.0.0.1"])
    for host in HOSTS:
        pki.issue_agent(root, host)
    return root

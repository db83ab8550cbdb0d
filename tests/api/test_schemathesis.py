"""schemathesis against /v1/openapi.json of a real collector app with seeded data:
no 5xx, and every response matches the status codes, media types and schemas the
document declares. Bounded: a fixed number of examples per operation, derandomized
so every run sends the same requests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from collector.api.keys import WEBHOOKS
from collector.api.registry import Role
from tests.api.env import ApiEnv, SeededBilling, api_env, seed_billing

POSITIVE_EXAMPLES = 8
NEGATIVE_EXAMPLES = 4
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def seeded_path_parameters(
    env: ApiEnv, subscription_id: str, billing: SeededBilling
) -> dict[str, str]:
    """Path parameters that name seeded things, so requests reach past the 404s."""
    return {"account": "acme", "host": "host-a", "token_id": env.token_ids["victim"],
            "subscription_id": subscription_id, "invoice": billing.invoice,
            "credit_note": billing.credit_note}


def property_test(
    strategy: Any, examples: int, base: str, headers: dict[str, str], checks: list[Any]
) -> Any:
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base, headers=headers, checks=checks)

    return check


def run_operations(base: str, env: ApiEnv, known: dict[str, str]) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
    headers = {"Authorization": f"Bearer {env.tokens['fuzzer']}"}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        names = {p.name for p in operation.path_parameters}
        seeded = {k: v for k, v in known.items() if k in names}
        modes = [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES)]
        if names or len(operation.query) or len(operation.body):  # something to get wrong
            modes.append((GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES))
        for mode, examples in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if seeded:
                strategy = st.one_of(
                    strategy, operation.as_strategy(generation_mode=mode, path_parameters=seeded)
                )
            checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE \
                else CHECKS

            check = property_test(strategy, examples, base, headers, checks)
            try:
                check()
            except Exception as exc:  # noqa: BLE001 (one report per failing operation, then on)
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    return failures


async def test_the_api_matches_its_openapi_document(tmp_path: Path, pki_dir: Path) -> None:
    async with api_env(tmp_path, pki_dir) as env:
        await env.token("victim", None, ("ingest",))
        await env.token("fuzzer", Role.ADMIN, ("ingest",))
        webhook = await env.app[WEBHOOKS].create("http://127.0.0.1:9/hooks", actor="cli:tests")
        known = seeded_path_parameters(env, webhook.subscription.id, await seed_billing(env))
        runner = web.AppRunner(env.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            failures = await asyncio.to_thread(
                run_operations, f"http://127.0.0.1:{port}", env, known
            )
        finally:
            await runner.cleanup()
    assert not failures, "\n\n".join(failures)

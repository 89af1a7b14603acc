"""Schemathesis against the admin API of a real gateway on PostgreSQL, with the admin token.

Every operation of ``/admin/openapi.json`` gets generated requests, valid and invalid:
no 5xx, every status, content type, header and body as the document declares, and every
invalid request refused with a 4xx. ``MODELFENCE_TEST_PROFILE=ci`` runs fewer examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json

from .conftest import ADMIN_TOKEN, PROFILE
from .test_admin_names import private_gateway

pytestmark = pytest.mark.postgres

EXAMPLES = 25 if PROFILE == "ci" else 150
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def admin_gateway(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with private_gateway(postgres_url, workdir, fake_upstream, "fuzz") as gateway:
        # The first verify/text loads the tokenizer (seconds); not what is being tested.
        http_json(
            "POST",
            gateway.url + "/admin/v1/verify/text",
            {"text": "warm up"},
            token=ADMIN_TOKEN,
            timeout=120,
        )
        yield gateway


@pytest.fixture(scope="module")
def admin_schema(admin_gateway: GatewayProcess) -> Any:
    return schemathesis.openapi.from_url(admin_gateway.url + "/admin/openapi.json")


schema = schemathesis.pytest.from_fixture("admin_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_admin_api_conforms_to_its_openapi(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)

"""The admin routes' OpenAPI contract with an admin key: Schemathesis generates requests for
every `/v2/admin/…` operation and checks each answer against the document (the suite's
contract test runs them with a tenant key, which only ever sees their 403)."""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode

from auraserve.store import keys
from tests.api.test_openapi_schemathesis import CHECKS
from tests.conftest import LiveServer, Tenant

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")


@pytest.fixture
def admin(api_only_server: LiveServer) -> Tenant:
    created = keys.create_account(api_only_server.runtime.db, "ops", credits=10, is_admin=True)
    return Tenant(created.key, created.account_id, created.key_id, created.webhook_secret)


@pytest.fixture
def admin_schema(api_only_server: LiveServer) -> Any:
    loaded = schemathesis.openapi.from_url(api_only_server.url + "/openapi.json")
    loaded.config.generation.update(modes=list(GenerationMode))
    return loaded


schema = schemathesis.pytest.from_fixture("admin_schema")


@schema.include(path_regex="^/v2/admin/").parametrize()
@hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_admin_contract(case: Any, admin: Tenant) -> None:
    case.call_and_validate(headers={"x-api-key": admin.key}, checks=CHECKS)

"""Fuzzing the API from its own OpenAPI schema: whatever schemathesis sends, valid
or not, the hive answers without a 5xx and stays up.

Drives schemathesis' strategies with hypothesis directly: its pytest plugin
does not run on this pytest version.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_makes_the_hive_fail(idle_hive, mode):
    url, _ = idle_hive
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    exercised = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            response = case.call(base_url=url, timeout=10)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"

        try:
            call()
            exercised.append(operation.label)
        except Unsatisfiable:
            # No invalid input exists for it (GET /health takes none): nothing to fuzz.
            assert mode is GenerationMode.NEGATIVE
    assert "POST /v1/inference" in exercised
    assert httpx.get(f"{url}/health").json()["status"] == "ok"

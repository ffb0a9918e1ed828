"""Property-based fuzzing of the documented API with schemathesis: no 5xx, no response off its schema.

Each operation of /openapi.json gets a bounded number of generated requests (valid and invalid
ones) against the running service.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import ApiClient

EXAMPLES_PER_OPERATION = 25


def test_documented_api_never_fails_or_breaks_its_schema(api: ApiClient) -> None:
    schema = schemathesis.openapi.from_url(api.url("/openapi.json"))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # every route is fuzzed, not just a few
    statuses: dict[str, list[int]] = {}

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case) -> None:
            response = case.call_and_validate(
                base_url=api.base_url,
                checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
            )
            statuses.setdefault(operation.label, []).append(response.status_code)  # noqa: B023  fuzz() runs in this iteration

        fuzz()

    assert set(statuses) == {operation.label for operation in operations}
    assert sum(len(codes) for codes in statuses.values()) >= 3 * len(operations)
    assert 422 in statuses["POST /v1/jobs"]  # generated uploads really reached validation

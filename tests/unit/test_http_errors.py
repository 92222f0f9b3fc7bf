"""The HTTP error edge: statuses, service error bodies, Retry-After, httpx exceptions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from connectors._http import (
    HttpPermanentError,
    HttpRecordRejected,
    HttpTransientError,
    map_http_errors,
    parse_retry_after,
    raise_for_status,
    service_error,
)
from connectors.base import (
    ConnectorUnavailable,
    PermanentError,
    RecordRejected,
    TransientError,
)

URL = "https://org.crm.dynamics.com/api/data/v9.2/accounts"


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None,
           text: str | None = None) -> httpx.Response:
    request = httpx.Request("PATCH", URL + "?$select=name")
    if text is not None:
        return httpx.Response(status, text=text, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.mark.parametrize(("value", "expected"), [
    ("120", 120.0), (" 3 ", 3.0), ("0.5", 0.5), ("-4", 0.0), (None, None), ("", None),
    ("soon", None),
])
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert parse_retry_after(later, now=now) == 90.0
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 507])
def test_transient_statuses(status: int) -> None:
    with pytest.raises(HttpTransientError) as info:
        raise_for_status(answer(status, {"error": {"code": "", "message": "later"}}))
    assert isinstance(info.value, TransientError) and info.value.status == status
    assert info.value.retry_after is None and info.value.code is None


def test_dataverse_429_with_retry_after_and_code() -> None:
    body = {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit "
                                                        "of 6000 over time window of 300 seconds."}}
    response = answer(429, body, {"Retry-After": "17", "x-ms-service-request-id": "req-1"})
    with pytest.raises(HttpTransientError) as info:
        raise_for_status(response, entity="account")
    error = info.value
    assert error.retry_after == 17.0 and error.code == "0x80072322" and error.entity == "account"
    assert error.request_id == "req-1"
    assert "exceeded the limit of 6000" in error.message and "429" in error.message
    assert "$select" not in error.message  # the query string stays out of errors


def test_4xx_with_a_key_is_record_rejected_with_the_service_text() -> None:
    body = {"error": {"code": "0x80060882", "message": "The version of the existing record "
                                                        "doesn't match the RowVersion property"}}
    with pytest.raises(HttpRecordRejected) as info:
        raise_for_status(answer(412, body), entity="account", key={"accountid": "a1"})
    assert isinstance(info.value, RecordRejected)
    assert info.value.code == "0x80060882" and info.value.status == 412
    assert info.value.key == {"accountid": "a1"} and "RowVersion" in info.value.message


def test_business_central_error_body() -> None:
    body = {"error": {"code": "Request_EntityChanged",
                      "message": "Another user has already changed the record.  CorrelationId: x"}}
    with pytest.raises(HttpRecordRejected) as info:
        raise_for_status(answer(409, body), entity="customers", key={"id": "c1"})
    assert info.value.code == "Request_EntityChanged"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 501])
def test_other_errors_without_key_are_permanent(status: int) -> None:
    with pytest.raises(HttpPermanentError) as info:
        raise_for_status(answer(status, {"error": {"code": "X", "message": "nope"}}))
    assert isinstance(info.value, PermanentError) and not isinstance(info.value, RecordRejected)


def test_auth_errors_are_never_record_rejected() -> None:
    with pytest.raises(HttpPermanentError):
        raise_for_status(answer(403, {"error": {"code": "PrivilegeDenied", "message": "no"}}),
                         key={"id": 1})


def test_success_does_nothing() -> None:
    raise_for_status(answer(204))
    raise_for_status(answer(304))


@pytest.mark.parametrize(("response", "expected"), [
    (answer(400, {"error": "invalid_scope", "error_description": "AADSTS70011: bad"}),
     ("invalid_scope", "AADSTS70011: bad")),
    (answer(502, text="<html>\n<h1>Bad gateway</h1>"), (None, "<html>")),
    (answer(503, text=""), (None, "Service Unavailable")),
    (answer(400, {"code": "BadRequest", "message": "flat"}), ("BadRequest", "flat")),
    (answer(400, [1, 2]), (None, "Bad Request")),
])
def test_service_error_shapes(response: httpx.Response, expected: tuple[str | None, str]) -> None:
    assert service_error(response) == expected


def test_long_service_text_is_cut() -> None:
    code, message = service_error(answer(400, {"error": {"code": "", "message": "x" * 5000}}))
    assert code is None and len(message) == 500


def raising(exc: Exception) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ReadError("reset"),
])
def test_transport_errors_are_connector_unavailable(exc: Exception) -> None:
    with raising(exc) as client, pytest.raises(ConnectorUnavailable) as info, \
            map_http_errors(entity="account", key={"id": 1}):
        client.get(URL)
    assert info.value.__cause__ is exc and info.value.entity == "account"
    assert "org.crm.dynamics.com" in info.value.message


def test_status_error_inside_the_block_is_mapped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "2"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(HttpTransientError) as info, map_http_errors():
        client.get(URL).raise_for_status()
    assert info.value.retry_after == 2.0
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


def test_unsupported_protocol_is_permanent() -> None:
    with httpx.Client() as client, pytest.raises(PermanentError), map_http_errors():
        client.get("ftp://example.invalid/")

"""Secrets are masked in URLs and free text, and redaction never raises."""

from __future__ import annotations

import pytest

from bus.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqps://sync:s3cret@rabbit/prod", "amqps://sync:***@rabbit/prod"),
        ("postgresql+psycopg://sync:pa%40ss@db:5432/erp", "postgresql+psycopg://sync:***@db:5432/erp"),
        ("https://api:tok@example.com/v1?x=1", "https://api:***@example.com/v1?x=1"),
        ("redis://:only-password@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://u:p@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
    ],
)
def test_the_password_of_a_url_is_masked(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///crm.db",
        "sqlite:////var/lib/syncbus/state.db",
        "postgresql+psycopg://sync@db/erp",
        "amqp://guest:@localhost/",
        "http://host:8080/path?mail=a@b.example",
        "http://[::1]:80/",
        "not a url at all",
        "",
    ],
)
def test_urls_without_a_password_are_unchanged(url):
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://sync:p@ss@db/erp",  # '@' not percent-encoded
        "amqp://sync:pa/ss@rabbit/vhost",  # '/' not percent-encoded
        "amqp://sync:pa#ss@rabbit/vhost",  # '#' not percent-encoded
    ],
)
def test_badly_encoded_passwords_are_masked_whole(url):
    redacted = redact_url(url)
    assert "ss@" not in redacted.replace("***@", "")
    assert redacted.startswith(url.split(":")[0] + "://sync:***@")


def test_secret_query_parameters_are_masked():
    assert redact_url("https://api.example.com/x?token=abc123&page=2") == (
        "https://api.example.com/x?token=***&page=2")


@pytest.mark.parametrize("weird", [None, 42, b"amqp://u:p@h/", object(), "://:@", "a://b:c"])
def test_redaction_never_raises(weird):
    assert isinstance(redact_url(weird), str)
    assert isinstance(redact_text(weird), str)


def test_every_url_in_free_text_is_masked():
    text = ('(psycopg.OperationalError) connection to postgresql+psycopg://sync:hunter2@db:5432/erp '
            'failed; broker "amqp://guest:guest@rabbit:5672/" refused; see https://sqlalche.me/e/20/e3q8')
    redacted = redact_text(text)
    assert "hunter2" not in redacted and "guest@" not in redacted
    assert "postgresql+psycopg://sync:***@db:5432/erp" in redacted
    assert '"amqp://guest:***@rabbit:5672/"' in redacted
    assert "https://sqlalche.me/e/20/e3q8" in redacted


def test_connection_string_passwords_in_text_are_masked():
    redacted = redact_text("invalid dsn: host=db user=sync password=hunter2 dbname=erp")
    assert redacted == "invalid dsn: host=db user=sync password=*** dbname=erp"

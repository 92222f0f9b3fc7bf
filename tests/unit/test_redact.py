"""Secrets are masked in URLs and free text, and redaction never raises."""

from __future__ import annotations

import pytest

from bus.core.redact import redact_text, redact_url, userinfo_problem


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


# -- passwords that needed percent-encoding ---------------------------------------------

NASTY_URLS = [
    # (url, password as the user meant it)
    ("amqp://relpw:p@ss#S3cr3t/x@127.0.0.1:5672/vhost", "p@ss#S3cr3t/x"),
    ("amqp://relpw:S3cr3t/x@127.0.0.1:5672/vhost", "S3cr3t/x"),
    ("amqp://relpw:12/3456@127.0.0.1:5672/vhost", "12/3456"),
    ("amqp://relpw:Se?cr3t@127.0.0.1:5672/", "Se?cr3t"),
    ("amqp://relpw:Sec#r3t", "Sec#r3t"),
    ("postgresql+psycopg://sync:p@ss@w0rd@db:5432/erp", "p@ss@w0rd"),
    ("postgresql+psycopg://sync:pa/ss#w0rd?x@db:5432/erp?sslmode=require", "pa/ss#w0rd?x"),
    ("https://api:t0k/en#x@example.com/v1", "t0k/en#x"),
]


def _fragments(secret: str) -> list[str]:
    return [secret[i:i + 4] for i in range(len(secret) - 3)]


@pytest.mark.parametrize(("url", "password"), NASTY_URLS)
def test_no_piece_of_a_badly_encoded_password_is_shown(url, password):
    for shown in (redact_url(url), redact_text(f"connecting to {url} failed: timed out")):
        assert not [f for f in _fragments(password) if f in shown], shown
        assert ":***" in shown


@pytest.mark.parametrize(("url", "password"), NASTY_URLS)
def test_a_url_whose_password_needs_encoding_is_named_without_quoting_it(url, password):
    problem = userinfo_problem(url)
    assert problem is not None and "must be percent-encoded: @ → %40" in problem
    assert not [f for f in _fragments(password) if f in problem]


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@127.0.0.1:5672/",
    "amqp://sync:p%40ss%23w0rd%2Fx@rabbit/prod",
    "amqp://sync:pa:ss@rabbit/prod",  # ':' is allowed in a password
    "amqps://rabbit:5671/",
    "sqlite:////var/lib/a@b.db",
    "postgresql+psycopg://sync@db/erp",
    "https://contoso.crm4.dynamics.com",
    "http://host:8080/path?mail=a@b.example",
    "not a url",
])
def test_urls_that_need_no_encoding_pass(url):
    assert userinfo_problem(url) is None


@pytest.mark.parametrize(("url", "part"), [
    ("amqp://sync:50%off@rabbit/", "the password"),  # '%' must start a %XX escape
    ("amqp://sync:pa ss@rabbit/", "the password"),
    ("amqp://sy nc:pass@rabbit/", "the user name"),
    ("amqp://sync:p@ss@rabbit/", "the password"),
    ("amqp://sync:pa/ss@rabbit/", "the user name or password"),
])
def test_the_part_that_needs_encoding_is_named(url, part):
    problem = userinfo_problem(url)
    assert problem is not None and problem.startswith(f"{part} must be percent-encoded")

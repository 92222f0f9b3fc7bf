"""What each RabbitMQ client raises becomes one line; other errors are left alone.

The real broker's answers are covered in tests/e2e/test_cli_edges.py and
tests/integration/test_broker_permissions.py; here the translation rules, including
what must *not* be taken for RabbitMQ.
"""

from __future__ import annotations

import socket

import pika.exceptions
import pytest
from amqp.exceptions import AccessRefused, NotAllowed, PreconditionFailed
from kombu.exceptions import OperationalError

from bus.amqp.errors import BrokerUnavailable, broker_errors, explain
from connectors.base import BrokerConnectionError, ConnectorUnavailable

URL = "amqp://bob:S3cr3t-pw@rabbit:5672/prod"


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(("exc", "reason", "message"), [
    (_chained(OperationalError("[Errno 111] Connection refused"),
              ConnectionRefusedError(111, "Connection refused")), "unreachable",
     "cannot reach RabbitMQ at amqp://bob:***@rabbit:5672/prod (connection refused); "
     "is it running?"),
    (pika.exceptions.AMQPConnectionError(socket.gaierror(-2, "Name or service not known")),
     "unreachable", "cannot reach RabbitMQ at amqp://bob:***@rabbit:5672/prod (host name not "
     "found); check the host in broker.url"),
    (AccessRefused(reply_text="ACCESS_REFUSED - Login was refused using authentication "
                   "mechanism PLAIN"), "login",
     "RabbitMQ at amqp://bob:***@rabbit:5672/prod refused the login of user 'bob' on vhost "
     "'prod' (ACCESS_REFUSED): check the user name and password in broker.url"),
    (pika.exceptions.ProbableAuthenticationError("ConnectionClosedByBroker: (403) 'ACCESS_REFUSED'"),
     "login", "RabbitMQ at amqp://bob:***@rabbit:5672/prod refused the login of user 'bob' on "
     "vhost 'prod' (ACCESS_REFUSED): check the user name and password in broker.url"),
    (NotAllowed(reply_text="NOT_ALLOWED - vhost prod not found", method_sig=(10, 40)), "vhost",
     "vhost 'prod' does not exist on the broker at amqp://bob:***@rabbit:5672/prod: create it "
     "with rabbitmqctl add_vhost prod"),
    (pika.exceptions.ProbableAccessDeniedError(
        "ConnectionClosedByBroker: (530) \"NOT_ALLOWED - access to vhost 'prod' refused for user "
        "'bob'\""), "no-access", "user 'bob' has no permissions on vhost 'prod' (NOT_ALLOWED): "
     "grant them with rabbitmqctl set_permissions -p prod bob … (see docs/operations.md, "
     "'RabbitMQ users with least privilege')"),
])
def test_each_client_error_becomes_one_line(exc, reason, message):
    problem = explain(exc, URL)
    assert problem is not None and problem.reason == reason
    assert problem.message == message
    assert "S3cr3t" not in problem.message


def test_a_broker_error_without_a_known_cause_keeps_its_own_words():
    problem = explain(BrokerConnectionError("cannot connect to amqp://bob:***@rabbit/: odd"), URL)
    assert problem is not None and problem.reason == "unreachable"
    assert problem.message.startswith("cannot reach RabbitMQ at amqp://bob:***@rabbit:5672/prod (")


@pytest.mark.parametrize("exc", [
    ValueError("x"),
    ConnectionRefusedError(111, "Connection refused"),  # not raised by a RabbitMQ client
    _chained(ConnectorUnavailable("cannot reach the database"),
             ConnectionRefusedError(111, "Connection refused")),
    PreconditionFailed(reply_text="PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"),
])
def test_other_errors_are_not_taken_for_rabbitmq(exc):
    assert explain(exc, URL) is None


def test_broker_errors_translates_inside_the_block_and_passes_the_rest():
    with pytest.raises(BrokerUnavailable) as caught, broker_errors(URL, name_url=False):
        raise pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "refused"))
    assert caught.value.message == "cannot reach RabbitMQ (connection refused); is it running?"
    assert isinstance(caught.value.__cause__, pika.exceptions.AMQPConnectionError)
    with pytest.raises(KeyError), broker_errors(URL):
        raise KeyError("not ours")

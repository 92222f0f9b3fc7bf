"""Smoke test: the raw-ceiling benchmark still runs end to end (tiny message count)."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from tests.bench.raw_ceiling import measure_raw_ceiling


@pytest.mark.integration
def test_raw_ceiling_runs_and_cleans_up(amqp_url: str) -> None:
    result = measure_raw_ceiling(amqp_url, count=3000, size=600, window=500, prefetch=200)
    assert result["count"] == 3000
    assert result["ack_every"] == 50
    for key in ("publish_rate", "consume_rate", "combined_rate"):
        assert result[key] > 0
    assert result["combined_rate"] < min(result["publish_rate"], result["consume_rate"])

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
            connection.channel().queue_declare(result["queue"], passive=True)
        assert excinfo.value.reply_code == 404, "the benchmark queue was not deleted"
    finally:
        if connection.is_open:
            connection.close()


def test_raw_ceiling_rejects_stalling_settings() -> None:
    with pytest.raises(ValueError, match="ack_every"):
        measure_raw_ceiling("amqp://unused/", count=10, size=10, prefetch=10, ack_every=20)

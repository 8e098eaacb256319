"""serving.metrics: a labelled series is looked up once and is prometheus_client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from serving.metrics import labelled


def test_labelled_gives_prometheus_clients_own_series_and_remembers_it() -> None:
    counter = Counter("answers", "test", labelnames=["model", "label"],
                      registry=CollectorRegistry())
    series = labelled(counter, "digits:v1", "7")
    assert series is counter.labels("digits:v1", "7")
    assert labelled(counter, "digits:v1", "7") is series
    assert labelled(counter, "digits:v1", "3") is not series
    series.inc(2)
    assert counter.labels(model="digits:v1", label="7")._value.get() == 2

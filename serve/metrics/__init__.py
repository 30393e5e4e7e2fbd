"""Metrics: plain stats in, Prometheus series out (the one place importing prometheus_client)."""

from __future__ import annotations

from mixserve.metrics.prometheus import Metrics
from mixserve.metrics.stats import RequestRecord

__all__ = ["Metrics", "RequestRecord"]

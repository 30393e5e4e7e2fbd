"""Scale-out with adapter affinity on Ray Serve (`pip install 'mixserve[ray]'`).

    serve run mixserve.ray_serve:app_builder model=/models/base adapter_dir=/adapters num_replicas=4

An ingress deployment exposes the OpenAI routes and forwards each request to an engine replica
with the adapter as Ray's `multiplexed_model_id`, so requests for an adapter go to replicas that
already hold it. See README "Scale-out with adapter affinity (Ray Serve)".
"""

from __future__ import annotations

try:
    import ray.serve  # noqa: F401 - fail here, with the fix, rather than deep in an import
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mixserve.ray_serve needs Ray Serve: pip install 'mixserve[ray]'") from exc

from mixserve.ray_serve.asgi import ForwardedRequest, ResponseHead
from mixserve.ray_serve.builder import app_builder, build_app, parse_app_args
from mixserve.ray_serve.ingress import REPLICA_HEADER, MixserveIngress, collect_replica_stats
from mixserve.ray_serve.replica import MixserveReplica

__all__ = [
    "REPLICA_HEADER",
    "ForwardedRequest",
    "MixserveIngress",
    "MixserveReplica",
    "ResponseHead",
    "app_builder",
    "build_app",
    "collect_replica_stats",
    "parse_app_args",
]

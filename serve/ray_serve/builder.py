"""Assemble the Ray Serve application: N engine replicas behind one OpenAI ingress.

`build_app` takes the same EngineConfig/ServerConfig as `mixserve serve`; `app_builder` takes
`serve run` arguments (key=value) and parses the serve flags with the CLI's own parser, so every
`mixserve serve` flag works: `serve run mixserve.ray_serve:app_builder model=/m adapter_dir=/a`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from mixserve.cli_serve import add_serve_arguments, configs_from_args
from mixserve.config import EngineConfig, ServerConfig
from mixserve.ray_serve.ingress import MixserveIngress
from mixserve.ray_serve.replica import MixserveReplica

# app_builder keys that configure Ray rather than the engine, with their types.
_RAY_KEYS: dict[str, type] = {
    "num_replicas": int,
    "max_adapters_per_replica": int,
    "max_ongoing_requests": int,
    "num_cpus": float,
    "num_gpus": float,
    "torch_threads": int,
    "max_attempts": int,
}


def build_app(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    *,
    num_replicas: int = 2,
    max_adapters_per_replica: int = 16,
    max_ongoing_requests: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    torch_threads: int | None = None,
    max_attempts: int = 3,
    replica_options: Mapping[str, Any] | None = None,
) -> Application:
    """The application to pass to `serve.run`.

    max_adapters_per_replica: adapter ids a replica advertises to Ray's router (its affinity set).
    max_ongoing_requests: per replica (default: the server's max_queue); Ray sends a request for
    a resident adapter elsewhere only once its replicas are this busy, so keep it high.
    replica_options: any other `Deployment.options` for the replicas (e.g. autoscaling_config,
    which replaces num_replicas).
    """
    ongoing = max_ongoing_requests or server_config.max_queue
    options: dict[str, Any] = {
        "num_replicas": num_replicas,
        "max_ongoing_requests": ongoing,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        **dict(replica_options or {}),
    }
    if "autoscaling_config" in options:
        options.pop("num_replicas")
    replicas = MixserveReplica.options(**options).bind(
        engine_config, server_config, max_adapters_per_replica, torch_threads
    )
    # The ingress only relays bytes; it must admit every replica's worth of requests.
    ingress = MixserveIngress.options(max_ongoing_requests=ongoing * max(1, num_replicas))
    return ingress.bind(replicas, server_config, max_attempts)


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _cli_argv(parser: argparse.ArgumentParser, args: Mapping[str, Any]) -> list[str]:
    """`serve run` key=value pairs (or a config file's args) -> `mixserve serve` flags."""
    # argparse has no public view of its actions; reading them keeps one list of flags.
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for dest, value in args.items():
        if dest == "adapter_dirs":  # plural accepted: a list, or paths joined by ',' or ':'
            dest = "adapter_dir"
        action = actions.get(dest)
        if action is None:
            raise ValueError(
                f"unknown argument {dest!r} (mixserve serve flags, or {sorted(_RAY_KEYS)})"
            )
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch (store_true)
            argv += [flag] if _switch(value) else []
        elif dest == "adapter_dir":
            paths = (
                value
                if isinstance(value, list | tuple)
                else str(value).replace(",", os.pathsep).split(os.pathsep)
            )
            argv += [part for path in paths if path for part in (flag, str(path))]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_app_args(
    args: Mapping[str, Any],
) -> tuple[EngineConfig, ServerConfig, dict[str, Any]]:
    """`serve run` arguments -> (engine config, server config, build_app keyword arguments).
    Keys may use '-' or '_'; unset flags take their MIXSERVE_* variable, as in `mixserve serve`."""
    normalized = {str(k).replace("-", "_"): v for k, v in args.items()}
    ray_args = {k: _RAY_KEYS[k](v) for k, v in normalized.items() if k in _RAY_KEYS}
    parser = argparse.ArgumentParser(prog="mixserve.ray_serve", add_help=False, exit_on_error=False)
    add_serve_arguments(parser)
    cli = {k: v for k, v in normalized.items() if k not in _RAY_KEYS}
    engine_config, server_config = configs_from_args(parser.parse_args(_cli_argv(parser, cli)))
    return engine_config, server_config, ray_args


def app_builder(args: Mapping[str, Any] | None = None) -> Application:
    """Entry for `serve run mixserve.ray_serve:app_builder key=value ...` and Serve config files."""
    engine_config, server_config, ray_args = parse_app_args(args or {})
    return build_app(engine_config, server_config, **ray_args)

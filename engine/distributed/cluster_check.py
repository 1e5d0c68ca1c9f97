"""Checks of ``cluster.yaml``: Ray's own autoscaler schema and defaults (``prepare_config`` then
``validate_config``, what ``ray up`` runs first) plus the rules Winnow's deployment relies on.

    python -m engine.distributed.cluster_check cluster.yaml

Winnow's rules: the Ray image is pinned to the installed Ray's version (driver and cluster
must match); the head is a CPU node; at least one GPU worker type scales from 0; the
dashboard binds to the head's loopback (reached with ``ray dashboard``, never public); token
authentication is on for every node (``RAY_AUTH_MODE=token`` in the containers' environment and
the token file mounted at ``~/.ray/auth_token``); the setup installs this package without moving
Ray.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import List

import yaml

GPU_FAMILIES = re.compile(r"^(p|g|inf|trn|dl)\d\w*\.", re.I)  # AWS accelerated instance families


def load(path: str | Path) -> dict:
    text = Path(path).read_text()
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return config


def validate_with_ray(config: dict) -> dict:
    """Ray's autoscaler preparation and schema validation; raises on a broken config and
    returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def winnow_problems(config: dict) -> List[str]:
    """Winnow's own deployment rules; an empty list when the config follows them."""
    import ray

    problems = []
    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        image = docker.get(key)
        if image and not re.search(rf":{re.escape(ray.__version__)}(-|$)", image):
            problems.append(f"docker.{key} {image!r} is not pinned to Ray {ray.__version__}")
    if not any(docker.get(k) for k in ("image", "head_image", "worker_image")):
        problems.append("docker: no Ray image given (pin rayproject/ray:<version>-...)")
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"), {})
    if GPU_FAMILIES.match(str((head.get("node_config") or {}).get("InstanceType", ""))):
        problems.append("the head node type is a GPU instance; use a CPU head")
    gpu_types = [name for name, t in types.items() if name != config.get("head_node_type")
                 and GPU_FAMILIES.match(str((t.get("node_config") or {}).get("InstanceType", "")))]
    if not gpu_types:
        problems.append("no GPU worker node type")
    for name in gpu_types:
        t = types[name]
        if int(t.get("min_workers", 0)) != 0 or int(t.get("max_workers", 0)) < 1:
            problems.append(f"node type {name!r}: a GPU worker type should scale from min_workers 0 to max_workers >= 1")
    start = " ".join(config.get("head_start_ray_commands") or [])
    if "--dashboard-host=127.0.0.1" not in start.replace("--dashboard-host 127.0.0.1", "--dashboard-host=127.0.0.1"):
        problems.append("head_start_ray_commands: start the dashboard on loopback (--dashboard-host=127.0.0.1); "
                        "reach it with `ray dashboard cluster.yaml`")
    run_options = " ".join(str(o) for o in docker.get("run_options") or [])
    if not re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token\b", run_options):
        problems.append("docker.run_options: turn token authentication on for every node (--env RAY_AUTH_MODE=token)")
    mounts = config.get("file_mounts") or {}
    if not any(str(k).rstrip("/").endswith("/.ray/auth_token") for k in mounts):
        problems.append("file_mounts: copy the cluster's token to every node "
                        "(/home/ray/.ray/auth_token: ~/.ray/auth_token, made by `ray get-auth-token --generate`)")
    setup = " ".join(config.get("setup_commands") or []) + " ".join(config.get("head_setup_commands") or [])
    if "pip install" not in setup or "winnow" not in setup:
        problems.append("setup_commands: install this package (pip install -e <mounted checkout>)")
    elif f"ray[data,train,tune,default]=={ray.__version__}" not in setup.replace(" ", ""):
        problems.append(f"setup_commands: pin Ray (\"ray[data,train,tune,default]=={ray.__version__}\") so the "
                        f"install cannot move it")
    return problems


def check(path: str | Path) -> List[str]:
    """All problems of the file: Ray's validation error (if any) and Winnow's rules."""
    try:
        config = load(path)
        validate_with_ray(config)
    except Exception as e:  # any error: schema, value and YAML errors all mean "broken"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"Ray rejects it: {type(e).__name__}: {first}"]
    return winnow_problems(config)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "cluster.yaml"
    problems = check(path)
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    if not problems:
        print(f"{path}: valid (Ray's autoscaler schema and Winnow's rules)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""cluster.yaml against Ray's own autoscaler schema (prepare_config / validate_config) and
Winnow's deployment rules; broken variants must be rejected."""
from __future__ import annotations

import copy

import pytest
import yaml

from engine.distributed import cluster_check
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture
def config():
    return yaml.safe_load(CLUSTER.read_text())


def write(tmp_path, cfg):
    p = tmp_path / "cluster.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_shipped_cluster_yaml_is_valid():
    assert cluster_check.check(CLUSTER) == []
    prepared = cluster_check.validate_with_ray(cluster_check.load(CLUSTER))
    assert prepared["provider"]["type"] == "aws"
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_cli(capsys):
    assert cluster_check.main([str(CLUSTER)]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("breakage, expect", [
    (lambda c: c.update(unknown_field=1), "Ray rejects it"),
    (lambda c: c.update(head_node_type="nope"), "Ray rejects it"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=20), "Ray rejects it"),
    (lambda c: c.pop("provider"), "Ray rejects it"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="many"), "Ray rejects it"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.9.0-py311-gpu"), "not pinned"),
    (lambda c: c["available_node_types"]["head"]["node_config"].update(InstanceType="p4d.24xlarge"), "GPU instance"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=2), "scale from min_workers 0"),
    (lambda c: c["available_node_types"]["gpu_worker"]["node_config"].update(InstanceType="m5.large"),
     "no GPU worker"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --dashboard-host=0.0.0.0"]), "loopback"),
    (lambda c: c.update(setup_commands=["echo hi"]), "install this package"),
    (lambda c: c["docker"].update(run_options=["--shm-size=16g"]), "token authentication"),
    (lambda c: c["docker"].update(run_options=["--env RAY_AUTH_MODE=disabled"]), "token authentication"),
    (lambda c: c["file_mounts"].pop("/home/ray/.ray/auth_token"), "copy the cluster's token"),
    (lambda c: c.update(setup_commands=["pip install -e /home/ray/winnow"]), "pin Ray"),
])
def test_broken_variants_are_rejected(tmp_path, config, breakage, expect):
    cfg = copy.deepcopy(config)
    breakage(cfg)
    problems = cluster_check.check(write(tmp_path, cfg))
    assert problems and any(expect in p for p in problems), problems
    assert cluster_check.main([str(tmp_path / "cluster.yaml")]) == 1

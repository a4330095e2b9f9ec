"""Deployment files: cluster.yaml against Ray's own schema, KubeRay manifests carry
the required fields, and every job entrypoint's flags parse with the real CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cxr_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RAYJOBS = sorted((ROOT / "deploy" / "k8s").glob("rayjob-*.yaml"))


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    gpu_types = [t for t in types if ".gpu." in t]
    assert gpu_types and all(types[t]["max_workers"] >= 1 for t in gpu_types)
    assert "cxr-ray" in prepared["docker"]["image"]


def test_rayjob_manifests_have_required_fields():
    assert {p.name for p in RAYJOBS} >= {"rayjob-train.yaml", "rayjob-screen.yaml"}
    for path in RAYJOBS:
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob", path
        spec = doc["spec"]
        assert spec["entrypoint"].startswith("python jobs/"), path
        cluster = spec["rayClusterSpec"]
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        groups = cluster["workerGroupSpecs"]
        assert any(
            "nvidia.com/gpu" in c["resources"]["limits"]
            for g in groups
            for c in g["template"]["spec"]["containers"]
        ), f"{path.name}: no GPU worker group"
        for group in groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_flags_parse_with_the_cli(path):
    argv = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
    script = ROOT / argv[1]
    assert script.is_file(), f"{path.name}: {argv[1]} does not exist"
    verb = script.stem  # jobs/<verb>.py runs `cxr-ray <verb>`
    parser, _ = build_parser()
    args = parser.parse_args([verb, *argv[2:]])
    assert args.verb == verb


def test_dockerfile_installs_the_pinned_stack():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "constraints.txt" in text and "tensorrt" in text.lower()

"""Serve configuration without a cluster: deploy/serve.yaml and the RayService embed
validate against Ray's own schema and build the app through Serve's own builder
call; ServeArgs refuses bad values with the field name; the CLI flags parse."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cxr_ray.serve.config import DeploymentArgs, ServeArgs

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deploy" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "k8s" / "rayservice.yaml"


def _import_path(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_serve_yaml_validates_and_its_import_path_builds_an_application():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = config.applications
    assert app.import_path == "cxr_ray.serve.app:app_builder"
    builder = _import_path(app.import_path)
    # Serve converts args into the builder's annotated pydantic model: ServeArgs.
    assert next(iter(inspect.signature(builder).parameters.values())).annotation is ServeArgs
    built = call_user_app_builder_with_args_if_necessary(builder, app.args)
    assert isinstance(built, Application)
    args = ServeArgs.model_validate(app.args)
    assert args.api_key_env and args.batching and args.predictor.max_ongoing_requests >= args.max_batch_size
    assert args.topology == "split"  # GPU cluster: decode replicas in front of GPU model replicas
    assert args.predictor.autoscaling and args.ingress.autoscaling
    assert args.predictor.max_queued_requests > 0 and args.ingress.max_queued_requests > 0
    assert args.layering_problems() == []  # overload is shed by the predictor: JSON 503s


def test_rayservice_embeds_the_same_application_as_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == yaml.safe_load(SERVE_YAML.read_text())["applications"]
    cluster = doc["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
    ]
    assert all(c["image"] == "ghcr.io/OWNER/cxr-ray:VERSION" for c in containers)
    # The API key comes from a Secret on every node, never from the config.
    assert all(
        any(e["name"] == "CXR_RAY_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in c["env"]) for c in containers
    )
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)


def test_serve_args_refuse_bad_values_by_name():
    with pytest.raises(ValidationError, match="backend"):
        ServeArgs(model="m", backend="tensorflow")
    with pytest.raises(ValidationError, match="not both"):
        DeploymentArgs(num_replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(ValidationError, match="max_queued_requests"):
        DeploymentArgs(max_queued_requests=0)
    with pytest.raises(ValidationError, match="min_replicas"):
        DeploymentArgs(autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="max_body_md"):
        ServeArgs.model_validate({"model": "m", "max_body_md": 3})  # typo: extra fields are refused
    with pytest.raises(ValidationError, match="topology"):
        ServeArgs(model="m", topology="mesh")
    assert ServeArgs(model="m").topology == "fused" and ServeArgs(model="m").layering_problems() == []
    for topology in ("fused", "split"):
        tight_ingress = ServeArgs(model="m", topology=topology, ingress=DeploymentArgs(max_ongoing_requests=8))
        assert any("plain-text 503" in p for p in tight_ingress.layering_problems()), topology
    # Fused: the batch fills inside the ingress replica, so its own limit must admit one.
    assert any("never fill" in p for p in ServeArgs(model="m", ingress=DeploymentArgs(max_ongoing_requests=4)).layering_problems())
    options = DeploymentArgs(num_replicas=2, max_ongoing_requests=4, max_queued_requests=8).serve_options()
    assert options == {"num_replicas": 2, "max_ongoing_requests": 4, "max_queued_requests": 8, "ray_actor_options": {}}


def test_serve_cli_flags_parse(monkeypatch, tmp_path):
    from cxr_ray.cli import build_parser
    from cxr_ray.commands.serve import build_args, curl_examples
    from cxr_ray.errors import UsageError

    parser, _ = build_parser()
    args = parser.parse_args(
        ["serve", "--model", str(tmp_path), "--port", "8123", "--backend", "onnxruntime",
         "--api-key-env", "CXR_TEST_KEY", "--max-body-mb", "8", "--no-batching"]
    )
    monkeypatch.delenv("CXR_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="CXR_TEST_KEY"):
        build_args(args)
    monkeypatch.setenv("CXR_TEST_KEY", "s3cret")
    serve_args = build_args(args)
    assert (serve_args.backend, serve_args.max_body_mb, serve_args.batching) == ("onnxruntime", 8.0, False)
    assert "s3cret" not in serve_args.model_dump_json()  # the key never enters the config
    assert serve_args.layering_problems() == []
    # Default fused: the replicas that answer HTTP hold the model and its resources.
    fused = build_args(parser.parse_args(["serve", "--model", str(tmp_path), "--replicas", "2",
                                          "--gpus-per-replica", "1"]))
    assert fused.topology == "fused" and fused.ingress.num_replicas == 2
    assert fused.ingress.ray_actor_options == {"num_cpus": 1, "num_gpus": 1.0} and fused.layering_problems() == []
    split = build_args(parser.parse_args(["serve", "--model", str(tmp_path), "--replicas", "2", "--topology", "split"]))
    assert (split.topology, split.ingress.num_replicas, split.predictor.num_replicas) == ("split", 1, 2)
    assert split.layering_problems() == []
    assert any("-F file=@" in c for c in curl_examples("http://127.0.0.1:8123", "CXR_TEST_KEY"))


def test_bench_serve_registers_as_a_suite():
    import argparse

    from cxr_ray.bench import serve as bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--arch", "mobilenet_v2", "--requests", "10"])
    assert (args.arch, args.image_size, args.requests, args.concurrency) == ("mobilenet_v2", 224, 10, "1,4,16")


def test_predictor_health_check_fails_when_the_backend_is_broken(tmp_path):
    """The model deployment's class, outside Serve: healthy with its backend, unhealthy
    when the backend no longer fits the artifact (here: a real backend of a model
    with another input size, as after a bad hot swap)."""
    from _serve_testing import make_artifact

    from cxr_ray.engines.load import load_backend
    from cxr_ray.serve.predictor import CxrPredictor

    artifact = make_artifact(tmp_path / "a")
    other = make_artifact(tmp_path / "b", image_size=96)
    predictor = CxrPredictor.func_or_class(ServeArgs(model=str(artifact), backend="onnxruntime").model_dump())
    predictor.check_health()
    info = predictor.info()
    assert info["backend"] == "onnxruntime" and info["classes"] == ["covid", "normal", "pneumonia"]
    assert "training" in info and all(not isinstance(v, (dict, list)) for v in info["training"].values())
    predictor.backend = load_backend(str(other), "onnxruntime")
    with pytest.raises(ValueError, match="expected a batch of shape"):
        predictor.check_health()

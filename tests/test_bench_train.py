"""``cxr-ray bench train``: the Ray Train loop and a plain PyTorch loop on the same data and model."""

from __future__ import annotations

import argparse

import pytest

from cxr_ray.bench import train as bench_train_module
from cxr_ray.errors import UsageError


def test_suite_parser_is_named_train_and_keeps_the_flags():
    parser = argparse.ArgumentParser()
    suites = parser.add_subparsers(dest="suite")
    bench_train_module.add_parser(suites)
    args = parser.parse_args(["train", "--arch", "mobilenet_v2", "--image-size", "128", "--batch-size", "16",
                              "--steps", "5"])
    assert (args.arch, args.image_size, args.batch_size, args.steps) == ("mobilenet_v2", 128, 16, 5)


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="resnet18"):
        bench_train_module.bench_train("resnet81")
    with pytest.raises(UsageError, match="image-size"):
        bench_train_module.bench_train("mobilenet_v2", image_size=16)


@pytest.mark.slow
def test_ray_train_and_plain_loop_are_measured_on_the_same_work(ray_cluster):
    result = bench_train_module.bench_train("resnet18", image_size=32, batch_size=8, steps=3, warmup_steps=1,
                                            images=24, cpus_per_worker=1)
    assert result["bench"] == "train" and result["device"] == "cpu"
    plain, ray_train = result["plain"], result["ray_train"]
    for run in (plain["before"], plain["after"], ray_train):
        assert run["images"] == 3 * 8  # the same number of timed steps and images on both sides
        assert run["images_per_s"] > 0 and run["seconds"] > 0
    assert ray_train["fit_wall_s"] > ray_train["seconds"]  # start-up is reported, not timed
    assert result["ratio"] == pytest.approx(ray_train["images_per_s"] / plain["images_per_s"], rel=1e-2)

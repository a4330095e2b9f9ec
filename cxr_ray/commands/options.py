"""Flags shared by several verbs, declared once, and flags built from a config record's fields.

A verb's flags come from the record it fills (``ScreenConfig``, ``TrainConfig``):
each field with ``help`` metadata becomes ``--field-name`` with the field's
type and default, so the default a user reads in ``--help`` is the one the
code uses. Options several verbs share (``--s3-endpoint``, ``--address``,
``--pseudonym-key-env``, ...) are declared here once.

Light on purpose: the CLI builds every verb's parser on each call.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from cxr_ray.engines.request import ENGINE_OPTION_NAMES, EngineRequest
from cxr_ray.errors import UsageError
from cxr_ray.screen import config as screen_config

SHARED: dict[str, dict[str, Any]] = {
    "s3_endpoint": {"flag": "--s3-endpoint", "metavar": "URL",
                    "help": "S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)"},
    "address": {"flag": "--address", "help": "Ray cluster address (else RAY_ADDRESS, else a local Ray)"},
    "pseudonym_key_env": {"flag": "--pseudonym-key-env", "metavar": "VAR",
                          "help": "environment variable holding the HMAC key for patient/study/instance pseudonyms"},
    "dicomweb_user_env": {"flag": "--dicomweb-user-env", "metavar": "VAR",
                          "help": "environment variable holding the DICOMweb HTTP basic user name"},
    "dicomweb_password_env": {"flag": "--dicomweb-password-env", "metavar": "VAR",
                              "help": "environment variable holding the DICOMweb HTTP basic password"},
    "dicomweb_token_env": {"flag": "--dicomweb-token-env", "metavar": "VAR",
                           "help": "environment variable holding a DICOMweb bearer token"},
    "model": {"flag": "--model", "metavar": "ARTIFACT", "required": True,
              "help": "model artifact directory (local or s3://)"},
}


ENGINE_GROUP = "engine"  # the argument group of ENGINE_OPTION_NAMES (ScreenConfig names it too)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# The EngineRequest fields every surface that loads a backend passes down (ENGINE_OPTION_NAMES); the
# defaults are EngineRequest's, so --help shows the ones the engines use.
SHARED.update({
    "calibration": {"flag": "--calibration", "metavar": "SPEC",
                    "help": "int8: the images it is calibrated on (manifest, folder or glob, local or s3://; a "
                            "seeded sample); required for --precision int8 on the CPU (OpenVINO + NNCF)"},
    "calibration_images": {"flag": "--calibration-images", "metavar": "N", "type": positive_int,
                           "default": EngineRequest.calibration_images,
                           "help": f"int8: calibration sample size (default {EngineRequest.calibration_images})"},
    "verify_labels": {"flag": "--verify-labels", "metavar": "SPEC",
                      "help": "a labelled set (labels manifest or folder tree, local or s3://) whose sample adds "
                              "real images and an AUC check to the engine's check against ONNX Runtime fp32"},
    "verify_images": {"flag": "--verify-images", "metavar": "N", "type": positive_int,
                      "default": EngineRequest.verify_images,
                      "help": f"--verify-labels sample size (default {EngineRequest.verify_images})"},
    "max_prob_diff": {"flag": "--max-prob-diff", "metavar": "X", "type": non_negative_float,
                      "help": "the largest probability difference from ONNX Runtime fp32 accepted at load (default: "
                              "the engine's tolerance); above it the engine is refused (auto: the next one is used)"},
})
assert set(ENGINE_OPTION_NAMES) <= set(SHARED)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The "engine" group: :data:`~cxr_ray.engines.request.ENGINE_OPTION_NAMES` as flags."""
    add_shared(parser.add_argument_group(ENGINE_GROUP), *ENGINE_OPTION_NAMES)


def parse_actors(text: str) -> tuple[int, int]:
    """``MIN,MAX`` or ``N`` predict actors, as an argparse type (the rule is ScreenConfig's)."""
    try:
        return screen_config.parse_actors(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def number_pair(text: str) -> list[float]:
    """``MIN,MAX`` as two floats (an argparse type)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two numbers), got {text!r}") from None
    return [low, high]


MEBIBYTE = 1024 * 1024
# Named flag types a field's metadata may ask for: (argparse type, flag value -> field value, field -> flag default).
FLAG_TYPES: dict[str, tuple[Callable[[str], Any], Callable[[Any], Any], Callable[[Any], Any]]] = {
    "actors": (parse_actors, lambda v: v, lambda v: v),
    "pair": (number_pair, lambda v: v, lambda v: v),
    "mebibytes": (float, lambda mb: None if mb is None else int(mb * MEBIBYTE),
                  lambda b: None if b is None else b / MEBIBYTE),
}


def add_shared(parser: argparse.ArgumentParser | Any, *names: str, **help_for: str) -> None:
    """Add the shared options ``names`` (``help_for[name]`` replaces the usual help)."""
    for name in names:
        spec = dict(SHARED[name])
        flag = spec.pop("flag")
        if name in help_for:
            spec["help"] = help_for[name]
        parser.add_argument(flag, dest=name, default=spec.pop("default", None), **spec)


def _python_type(field: dataclasses.Field[Any]) -> Callable[[str], Any] | None:
    text = str(field.type)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if text.split(" ")[0].startswith(name) or text.startswith(f"list[{name}]"):
            return kind
    return None


def _flag_default(field: dataclasses.Field[Any]) -> tuple[Any, dict[str, Any]]:
    """(the flag's default, its ``type`` argument) for ``field``."""
    meta = field.metadata
    default = field.default if field.default is not dataclasses.MISSING else None
    if "type" in meta:
        kind, _, to_flag = FLAG_TYPES[meta["type"]]
        return to_flag(default), {"type": kind}
    if meta.get("action") in ("store_true", "store_false"):
        return default, {}
    return default, {"type": _python_type(field)}


def _shown(default: Any, required: bool) -> str:
    if default is None or required or isinstance(default, bool):
        return ""
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser | Any, config: type, names: Iterable[str] | None = None) -> None:
    """``--field-name`` for each field of the dataclass ``config`` that has ``help`` (or ``shared``) metadata.

    Metadata: ``help``; optional ``flag`` / ``flags`` (other names), ``group`` (argument group title),
    ``metavar``, ``choices``, ``action``, ``type`` (a :data:`FLAG_TYPES` name).
    """
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        meta = field.metadata
        if (names is not None and field.name not in names) or not ("help" in meta or "shared" in meta):
            continue
        target = parser
        if "group" in meta:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if "shared" in meta:
            add_shared(target, meta["shared"])
            continue
        default, kwargs = _flag_default(field)
        kwargs.update({k: meta[k] for k in ("metavar", "choices", "action") if k in meta})
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        flags = meta.get("flags") or (meta.get("flag", "--" + field.name.replace("_", "-")),)
        help_text = meta["help"] if meta["help"] == argparse.SUPPRESS else meta["help"] + _shown(default, required)
        target.add_argument(*flags, dest=field.name, required=required, default=default, help=help_text, **kwargs)


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of ``config`` that ``args`` carries, converted back from their flag types."""
    out = {}
    for field in dataclasses.fields(config):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if "type" in field.metadata:
            value = FLAG_TYPES[field.metadata["type"]][1](value)
        out[field.name] = value
    return out

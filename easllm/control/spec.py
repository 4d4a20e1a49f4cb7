"""A service spec: the JSON a user deploys (like a cloud service config), validated in one place.

```json
{"name": "llm_demo001", "model": "qwen2.5-0.5b-instruct", "engine": "llamacpp", "replicas": 1,
 "resources": {"cpu": 2, "memory": 4000, "gpu": 0}, "args": ["--max-new-tokens", "512"]}
```
`memory` is in MiB, as in EAS service configs. `token` is generated when absent. `args` are extra
`easllm serve` flags; those the spec owns (model, engine, precision, host, port, token, name) are
refused there so a spec has one meaning.
"""

from __future__ import annotations

import argparse
import re
import secrets
from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from easllm.errors import InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
Engine = Literal["transformers", "llamacpp", "vllm", "fake"]
Precision = Literal["fp32", "fp16", "bf16"]
Runtime = Literal["local", "ray"]
MAX_REPLICAS = 16
# serve flags set from spec fields or by the console itself: dest -> the spec field to use instead
OWNED_FLAGS = {
    "model_path": "model",
    "engine": "engine",
    "precision": "precision",
    "host": "(set by the console)",
    "port": "(set by the console)",
    "token": "token",
    "token_file": "token",
    "service_name": "name",
    "root_path": "(set by the console)",
    "cpu": "resources.gpu (0 = CPU only)",
    "tensor_parallel_size": "resources.gpu (vllm: GPUs per replica)",
}


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: int | None = Field(None, ge=1, le=1024, description="CPU cores (also the engine's threads)")
    memory: int | None = Field(None, ge=64, description="memory in MiB")
    gpu: int = Field(0, ge=0, le=16, description="GPUs; 0 runs on the CPU")


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling: replicas between min and max, by requests in flight per replica."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica")
    upscale_delay_s: float = Field(30.0, ge=0, description="load must last this long before adding")
    downscale_delay_s: float = Field(600.0, ge=0, description="quiet must last this long before removing")

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServiceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="letters, digits and _, starting with a letter (e.g. llm_demo001)")
    model: str = Field("qwen2.5-0.5b-instruct", min_length=1, max_length=4096)
    engine: Engine | None = Field(None, description="default: llamacpp for GGUF, transformers for HF")
    precision: Precision | None = None
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    resources: Resources = Field(default_factory=Resources)
    token: str | None = Field(None, min_length=8, max_length=256)
    args: list[str] = Field(default_factory=list, description="extra `easllm serve` flags")
    runtime: Runtime = Field("local", description="local: processes on this machine; ray: Ray Serve")
    autoscaling: Autoscaling | None = Field(None, description="runtime ray: replicas follow the load")
    ray_address: str | None = Field(
        None, min_length=1, max_length=512, description="runtime ray: the cluster (default: the console's)"
    )

    @field_validator("autoscaling", "ray_address")
    @classmethod
    def _ray_only(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("runtime") != "ray":
            raise ValueError('only for "runtime": "ray"')
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                "must start with a letter and hold only letters, digits and _ (at most 63 characters)"
            )
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value):
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        parse_serve_args(value)
        return value

    def with_token(self) -> ServiceSpec:
        """This spec, with a fresh random token when it has none."""
        return self if self.token else self.model_copy(update={"token": secrets.token_urlsafe(24)})

    def serve_options(self) -> argparse.Namespace:
        return parse_serve_args(self.args)

    def public(self) -> dict[str, Any]:
        """The spec as JSON, without its token."""
        return self.model_dump(exclude={"token"})


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit
        raise ValueError(message)


def serve_parser() -> argparse.ArgumentParser:
    from easllm.serve_flags import add_serve_flags

    parser = _RaisingParser(prog="easllm serve", add_help=False, exit_on_error=False)
    add_serve_flags(parser)
    return parser


def parse_serve_args(args: list[str]) -> argparse.Namespace:
    """Extra serve flags, checked by the real `easllm serve` parser; spec-owned flags refused."""
    parser = serve_parser()
    unset = object()  # an owned flag given at all (even with its default value, or abbreviated) is refused
    parser.set_defaults(**dict.fromkeys(OWNED_FLAGS, unset))
    try:
        options = parser.parse_args(args)
    except (argparse.ArgumentError, ValueError) as exc:
        raise ValueError(f"not a valid `easllm serve` flag list: {exc}") from exc
    for dest, instead in OWNED_FLAGS.items():
        if getattr(options, dest) is not unset:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is set by the console; use {instead} instead")
    return serve_parser().parse_args(args)


def parse_spec(data: object, param_prefix: str = "") -> ServiceSpec:
    """JSON -> ServiceSpec, or InvalidRequest naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("a service spec must be a JSON object", None)
    try:
        return ServiceSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_from(exc, param_prefix) from exc
    except RecursionError as exc:
        raise InvalidRequest("the spec is nested too deeply", param_prefix or None) from exc


def invalid_from(exc: ValidationError, param_prefix: str = "") -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "spec"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return InvalidRequest(f"{param_prefix}{field}: {message}", param_prefix + field)


def merge_update(spec: ServiceSpec, changes: object) -> ServiceSpec:
    """The spec of the next version: `changes` (a JSON object) over `spec` (name cannot change)."""
    if not isinstance(changes, dict) or not changes:
        raise InvalidRequest("an update needs at least one field to change", None)
    if "name" in changes and changes["name"] != spec.name:
        raise InvalidRequest("name: a service cannot be renamed", "name")
    merged = spec.model_dump()
    for key, value in changes.items():
        if key in ("resources", "autoscaling") and isinstance(value, dict) and merged.get(key):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    new = parse_spec(merged)
    return new if new.token else new.model_copy(update={"token": spec.token})


def scales_only(old: ServiceSpec, new: ServiceSpec) -> bool:
    """`new` differs from `old` in its replica count alone: the same processes keep serving."""
    return new.model_copy(update={"replicas": old.replicas}) == old


class SpecCache:
    """Each version's spec, read from the database once (a version's spec never changes)."""

    def __init__(self, load: Callable[[str, int], ServiceSpec]) -> None:
        self._load = load
        self._specs: dict[tuple[str, int], ServiceSpec] = {}

    def get(self, service: str, version: int) -> ServiceSpec:
        key = (service, version)
        if key not in self._specs:
            self._specs[key] = self._load(service, version)
        return self._specs[key]

    def put(self, service: str, version: int, spec: ServiceSpec) -> None:
        self._specs[(service, version)] = spec

    def forget(self, service: str) -> None:
        for key in [k for k in self._specs if k[0] == service]:
            del self._specs[key]

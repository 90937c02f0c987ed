"""The encoder registry: `model.name` → the Linen module that builds it, and its config block.

Each encoder module registers itself where it is defined:

    @register_encoder("small_cnn")
    class SmallCNN(nn.Module): ...

    register_encoder("resnet18", fixed={"block": BasicBlock, "model_name": "resnet18"},
                     stage_sizes=(2, 2, 2, 2))(ResNet)

Every dataclass field of the module except the COMMON_FIELDS (set from the top-level
`config.model.*` keys), the `fixed` constructor arguments and the spec's `top_level` fields is
the encoder's own *field*, reachable as `config.model.<name>.<field>` (a block that
experiments/default.py fills from `default_fields`, so the two cannot drift). Only the block of
`config.model.name` reaches the module (`config_kwargs`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.checks import check_one_of, check_positive_int
from facenet_jax.models.layers import DTYPES, INPUT_NORMS
from facenet_jax.registry import Registry

# Fields every encoder has, set from config.model.embedding_dim / dtype / input_norm and by the
# caller (bn_axis_name); never in a block.
COMMON_FIELDS = ("embedding_dim", "dtype", "bn_axis_name", "input_norm")
# Flax's own dataclass fields of every Module.
_FLAX_FIELDS = ("parent", "name")
# Value ranges [low, high) of fields that mean the same in every encoder; other numbers are
# sizes and counts, integers >= 1 (>= 0 where the spec says `zero_ok`).
FIELD_RANGES = {"dropout_rate": (0.0, 1.0), "bn_momentum": (0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How a registered name builds its module.

    fixed: constructor arguments that are not config fields (classes, the name in errors).
    defaults: this name's field defaults where they differ from (or are missing in) the
    module's, e.g. a ResNet depth's stage_sizes.
    top_level: fields read from `config.model.<field>` instead of the block (inception's
    `bn_scale`, a key older than the blocks).
    zero_ok: integer fields that may be 0 (e.g. a block count removed in an ablation).
    """

    module: type[nn.Module]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    top_level: tuple[str, ...] = ()
    zero_ok: tuple[str, ...] = ()


ENCODERS: Registry[EncoderSpec] = Registry("model name")


def register_encoder(name: str, *, fixed: Mapping[str, Any] | None = None,
                     top_level: tuple[str, ...] = (), zero_ok: tuple[str, ...] = (),
                     **defaults: Any) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """A class decorator registering a Linen encoder module as `name` (see the module
    docstring); returns the class unchanged. Its fields must all have defaults (in the module
    or in `defaults`) unless `fixed` sets them."""
    def register(module: type[nn.Module]) -> type[nn.Module]:
        spec = EncoderSpec(module, dict(fixed or {}), defaults, tuple(top_level), tuple(zero_ok))
        names = {f.name for f in dataclasses.fields(module)}
        stray = sorted((set(spec.fixed) | set(defaults) | set(top_level)) - names)
        if stray:
            raise ValueError(f"encoder {name!r}: {stray} are not fields of {module.__name__}")
        _block_defaults(name, spec)  # every field has a default: fail here, not at use
        ENCODERS.add(name, spec)
        return module
    return register


def default_fields(name: str) -> dict[str, Any]:
    """{field: default} of encoder `name`'s config block, in the module's field order (tuples
    for sequences, as ml_collections holds them)."""
    return _block_defaults(name, ENCODERS.get(name))


def _block_defaults(name: str, spec: EncoderSpec) -> dict[str, Any]:
    excluded = set(COMMON_FIELDS) | set(_FLAX_FIELDS) | set(spec.fixed) | set(spec.top_level)
    fields = {}
    for field in dataclasses.fields(spec.module):
        if field.name in excluded:
            continue
        value = spec.defaults.get(field.name, field.default)
        if value is dataclasses.MISSING:
            raise ValueError(f"encoder {name!r}: field {field.name!r} of "
                             f"{spec.module.__name__} has no default; give one at registration")
        fields[field.name] = tuple(value) if isinstance(value, list) else value
    return fields


def create_model(name: str, *, embedding_dim: int = 128, dtype: Any = jnp.float32,
                 bn_axis_name: str | None = None, **kwargs: Any) -> nn.Module:
    """The encoder called `name`; `kwargs` are its fields (e.g. small_cnn's `widths`, defaults
    otherwise) or other common ones (input_norm). ValueError for an unknown name, listing the
    registered ones."""
    spec = ENCODERS.get(name)
    common = dict(embedding_dim=embedding_dim, dtype=dtype, bn_axis_name=bn_axis_name)
    return spec.module(**common, **spec.fixed, **{**spec.defaults, **kwargs})


def config_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields `config.model` gives its encoder: the block `config.model.<name>` checked
    against `default_fields` (a missing block or field reads as its default, so a partial
    model config such as {"name": "resnet50"} builds the module's defaults) plus the spec's
    top-level fields.

    ValueError naming the key for an unknown model.name, a block of no encoder, an unknown
    field (with the valid ones) or a value of the wrong type or range.
    """
    name = model_config["name"]
    spec = ENCODERS.get(name, key="model.name")
    others = sorted(key for key, value in model_config.items()
                    if isinstance(value, Mapping) and key not in ENCODERS)
    if others:
        raise ValueError(f"config.model.{others[0]} is the block of no encoder; blocks are "
                         f"named after model names: {', '.join(ENCODERS.names())}")
    defaults = default_fields(name)
    block = dict(model_config.get(name) or {})
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in config.model.{name}; valid fields: "
                         f"{', '.join(defaults)}")
    fields = {field: _checked(f"config.model.{name}.{field}", block.get(field, default),
                              default, zero_ok=field in spec.zero_ok,
                              bounds=FIELD_RANGES.get(field))
              for field, default in defaults.items()}
    return {**fields, **{field: model_config[field] for field in spec.top_level}}


def validate_model_config(model_config: Mapping[str, Any]) -> None:
    """ValueError naming the key and the fix for a bad `config.model`: model.name and its block
    (`config_kwargs`, through the ENCODERS entry), embedding_dim, dtype, input_norm, and
    bn_scale where the entry has no such top-level field. (model.init_from and the cached
    features are checked by `finetune` and `features_cache`.)"""
    config_kwargs(model_config)
    check_positive_int(model_config["embedding_dim"], "model.embedding_dim")
    check_one_of(model_config["dtype"], DTYPES, "model.dtype")
    check_one_of(model_config["input_norm"], INPUT_NORMS, "model.input_norm")
    with_bn_scale = [name for name in ENCODERS.names()
                     if "bn_scale" in ENCODERS.get(name).top_level]
    if model_config["bn_scale"] and model_config["name"] not in with_bn_scale:
        raise ValueError(f"model.bn_scale=True is an option of {', '.join(with_bn_scale)} only "
                         f"(model.name is {model_config['name']!r}); leave it False")


def _checked(key: str, value: Any, default: Any, *, zero_ok: bool,
             bounds: tuple[float, float] | None) -> Any:
    """`value` in the type of `default` (a list becomes a tuple); ValueError naming `key`."""
    def fail(expected: str) -> ValueError:
        return ValueError(f"{key} must be {expected} (default {default!r}), got {value!r}; "
                          f"pass --{key}=...")

    def count(x: Any) -> bool:
        return (isinstance(x, numbers.Integral) and not isinstance(x, bool)
                and x >= (0 if zero_ok else 1))

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail("True or False")
        return value
    if isinstance(default, numbers.Integral):
        if not count(value):
            raise fail(f"an integer >= {0 if zero_ok else 1}")
        return int(value)
    if isinstance(default, numbers.Real):
        low, high = bounds or (-math.inf, math.inf)
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or not low <= value < high):
            raise fail("a finite number" + (f" in [{low}, {high})" if bounds else ""))
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)) or not value or not all(map(count, value)):
            raise fail(f"a non-empty tuple of integers >= {0 if zero_ok else 1}")
        return tuple(int(v) for v in value)
    if isinstance(default, str) and not isinstance(value, str):
        raise fail("a string")
    return value

"""Temporary shim for the layers and generate.py importing from here; deleted once they import kimi_jax.backend."""

import functools

from kimi_jax.backend import pallas_options, platform, resolve, target_platform

resolve_attention_impl = functools.partial(resolve, "attention")
resolve_moe_impl = functools.partial(resolve, "moe")

__all__ = ["pallas_options", "platform", "resolve_attention_impl", "resolve_moe_impl", "target_platform"]

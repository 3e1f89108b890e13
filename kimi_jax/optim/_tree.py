"""Pytree helpers shared by the optimizer modules: '/'-joined leaf paths and spec-vs-params matching."""

from collections.abc import Callable
from typing import Any

import jax


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path as 'moe_layers/attn/q_b/kernel' (dict keys, attribute names and indices joined by '/')."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
  """The '/'-joined path of every leaf of `tree`, in `jax.tree.leaves` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_spec(
  tree: Any, spec: Any, what: str, is_spec_leaf: Callable[[Any], bool], tree_name: str = "params"
) -> list[Any]:
  """One entry of `spec` per leaf of `tree` (`jax.tree.leaves` order).

  `spec` must have `tree`'s structure down to `tree`'s leaves; whatever sits at a leaf position (None, a
  tuple, an object) is returned whole. On a mismatch the error lists the paths present in only one of them.
  """
  try:
    return jax.tree.structure(tree).flatten_up_to(spec)
  except (ValueError, TypeError):
    tree_paths = set(leaf_paths(tree))
    spec_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)[0]}
    missing, extra = sorted(tree_paths - spec_paths), sorted(spec_paths - tree_paths)
    detail = (
      f"{tree_name} entries missing from {what}: {missing[:10]}; {what} entries not in {tree_name}: {extra[:10]}"
      if missing or extra
      else f"same paths but different container types: {jax.tree.structure(tree)}"
    )
    raise ValueError(f"{what} does not match the {tree_name} tree: {detail}.") from None

"""Adapter setup folders: a composition, its members, fusions and heads as one folder.

The layout is AdapterHub 1.x's (``save_adapter_setup``), which we write as well:

* ``adapter_setup.json``: ``adapter_setup`` (the block's ``to_dict()``: ``{"type": "Fuse",
  "children": [{"type": "single", "children": ["a"]}, ...], "kwargs": {...}}``), ``head_setup``
  (null, a head name, a list of names, a block's ``to_dict()``, or ``true``: the one head of a
  model without named heads, saved in the folder itself) and ``version``;
* ``<adapter>/``: each member adapter, in a folder named like it;
* ``<fusion name>/``: each Fuse's fusion layer (its name: the members joined by commas unless named);
* ``<head>/``: each head of the head setup (``head_config.json`` + weights); a head named like a
  member or a fusion shares its folder.

This module reads and writes the setup file and the head folders as plain data; the model applies
them (:mod:`adaptercli.model_io`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..composition import CompositionBlock, CompositionError, Fuse, blocks_in
from . import adapterhub, native
from .common import AdapterFileError, LoadedHead, read_json, write_json

CONFIG = "adapter_setup.json"
HeadSetup = str | list[str] | CompositionBlock | bool | None


@dataclasses.dataclass
class LoadedSetup:
    """A setup folder's composition and head setup, as saved."""

    adapter_setup: CompositionBlock
    head_setup: HeadSetup


def is_setup(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def head_names(head_setup: HeadSetup) -> list[str]:
    """The named heads a head setup stands for (``True``: the model's one head, no name)."""
    if isinstance(head_setup, CompositionBlock):
        return head_setup.flatten()
    if isinstance(head_setup, str):
        return [head_setup]
    return list(head_setup) if isinstance(head_setup, list) else []


def fusions_in(setup: CompositionBlock) -> list[Fuse]:
    """Every Fuse block of ``setup`` (each has a folder of its own)."""
    return [block for block in blocks_in(setup) if isinstance(block, Fuse)]


def _what_it_holds(folder: Path) -> str:
    """A hint for a folder that is not a setup: what to do with what it is."""
    if folder.name == "adapter" and (folder.parent / "recipe.yaml").is_file():
        return (" (a run folder: `adapter export RUN --dest DIR` writes a fusion or stack run as a setup; "
                "load_adapter loads its adapter)")
    if (folder / "adapter_config.json").is_file():
        return " (it holds one adapter: load it with load_adapter)"
    if (folder / "adapter_fusion_config.json").is_file():
        return " (it holds a fusion: load it with load_adapter_fusion)"
    return ""


def read_setup(folder: Path) -> LoadedSetup:
    """Read ``adapter_setup.json``; a folder without one is refused in one line."""
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: adapter setup folder not found")
    if not is_setup(folder):
        raise AdapterFileError(f"{folder}: not an adapter setup folder (no {CONFIG}){_what_it_holds(folder)}")
    meta = read_json(folder / CONFIG)
    if not isinstance(meta.get("adapter_setup"), dict):
        raise AdapterFileError(f"{folder / CONFIG}: 'adapter_setup' must be a composition block")
    try:
        adapter_setup = CompositionBlock.from_dict(meta["adapter_setup"])
        head_setup = meta.get("head_setup")
        if isinstance(head_setup, dict):
            head_setup = CompositionBlock.from_dict(head_setup)
    except (CompositionError, KeyError, TypeError, IndexError) as exc:
        raise AdapterFileError(f"{folder / CONFIG}: not a composition this version reads ({exc})") from None
    if head_setup is not None and not isinstance(head_setup, str | list | bool | CompositionBlock):
        raise AdapterFileError(f"{folder / CONFIG}: 'head_setup' must be null, a name, a list or a block")
    return LoadedSetup(adapter_setup, head_setup)


def write_setup(folder: Path, adapter_setup: CompositionBlock, head_setup: HeadSetup) -> None:
    """Write ``adapter_setup.json`` (after the members, fusions and heads: a folder whose setup file
    exists is complete)."""
    heads = head_setup.to_dict() if isinstance(head_setup, CompositionBlock) else head_setup
    write_json(folder / CONFIG, {"format": native.FORMAT, "version": native.VERSION,
                                 "adapter_setup": adapter_setup.to_dict(), "head_setup": heads})


def read_head(folder: Path, name: str) -> LoadedHead:
    """The head saved in ``folder`` (ours or AdapterHub's ``head_config.json`` + weights)."""
    if not (folder / native.HEAD_CONFIG).is_file():
        raise AdapterFileError(f"{folder}: the setup names head '{name}', but there is no {native.HEAD_CONFIG}")
    loaded = LoadedHead()
    reader = native.read_head if native.is_native(read_json(folder / native.HEAD_CONFIG)) else adapterhub.read_head
    reader(folder, loaded, name)
    if not loaded.head_weights and loaded.head_config is None:
        raise AdapterFileError(f"{folder / native.HEAD_CONFIG}: saved without a head config (a model without heads)")
    return loaded


def write_head(folder: Path, meta: dict[str, Any], weights: dict[str, Any]) -> None:
    native.write_head(folder, (meta, weights))

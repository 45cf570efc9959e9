"""Adapter folders as plain data: our native format, AdapterHub's and PEFT's.

Each format module reads a folder into a :class:`~.common.LoadedAdapter` (config, weights with
backbone-relative keys, head) and writes such data back; none of them touches a model.
``read_adapter`` detects a folder's format from its ``adapter_config.json``. Applying the data to
a model (checking that it fits, adding the adapter) is :mod:`adaptercli.model_io`'s job; turning
a name (Hub id, index id, run folder) into a local folder is :mod:`adaptercli.locate`'s.
"""

from __future__ import annotations

from pathlib import Path

from . import adapterhub, native, peft
from .common import AdapterFileError, LoadedAdapter, LoadedFusion, read_json
from .fusion import read_fusion, write_fusion

__all__ = ["AdapterFileError", "LoadedAdapter", "LoadedFusion", "read_adapter", "read_fusion", "write_fusion"]


def read_adapter(folder: Path, with_head: bool = True, backbone_prefix: str = "") -> LoadedAdapter:
    """Read a local adapter folder, whatever its format (adaptercli, AdapterHub, PEFT)."""
    folder = Path(folder)
    if folder.is_file():
        raise AdapterFileError(f"{folder}: expected an adapter folder, found a file")
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: adapter folder not found")
    if not (folder / "adapter_config.json").exists():
        raise AdapterFileError(
            f"{folder}: not an adapter folder (no adapter_config.json; adaptercli, AdapterHub and PEFT folders have one)"
        )
    meta = read_json(folder / "adapter_config.json")
    if peft.is_peft(meta):
        return peft.read(folder, meta, backbone_prefix)
    if native.is_native(meta):
        return native.read(folder, meta, with_head)
    if adapterhub.is_adapterhub(meta, folder):
        return adapterhub.read(folder, meta, with_head)
    raise AdapterFileError(f"{folder / 'adapter_config.json'}: not a format adaptercli knows (adaptercli, AdapterHub, PEFT)")

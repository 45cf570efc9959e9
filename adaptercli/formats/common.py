"""What the format readers hand to the loader, and safe file helpers shared by the writers."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import AdapterCliError
from ..heads import HeadConfig
from ..methods import MethodConfig


class AdapterFileError(AdapterCliError):
    """A missing, unreadable or incompatible adapter folder."""


@dataclasses.dataclass
class LoadedAdapter:
    """An adapter read from disk, in our terms: backbone-relative weight keys (``saved_name`` as
    it appears in them) and, optionally, a head."""

    config: MethodConfig
    weights: dict[str, torch.Tensor]
    saved_name: str
    model_type: str | None = None
    hidden_size: int | None = None
    head_config: HeadConfig | None = None
    head_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    head_is_static: bool = False  # weights of a transformers task model's own head (e.g. `classifier`)
    head_name: str | None = None
    model_name: str | None = None  # the base model it was trained on, as its file records it


@dataclasses.dataclass
class LoadedFusion:
    """An AdapterFusion read from disk: its members, config (a dict), backbone-relative weights
    (``...adapter_fusion_layer.<saved_name>...``) and, optionally, a head saved beside it."""

    saved_name: str
    members: list[str]
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    model_type: str | None = None
    hidden_size: int | None = None
    head_config: HeadConfig | None = None
    head_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    head_is_static: bool = False
    head_name: str | None = None


@dataclasses.dataclass
class LoadedHead:
    """A head read from a folder of its own (a setup's head folder)."""

    head_config: HeadConfig | None = None
    head_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    head_is_static: bool = False
    head_name: str | None = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


def read_weights(folder: Path, *names: str) -> dict[str, torch.Tensor]:
    """Read the first of ``names`` that exists: safetensors, or a pickle loaded with
    ``weights_only=True`` (tensors only, never arbitrary objects)."""
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(path))
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or hostile files: one clear message, no traceback
            raise AdapterFileError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterFileError(f"{path}: expected a dictionary of tensors")
        return data
    raise AdapterFileError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place, so a crash
    leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_weights(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))

"""``adapter merge``: adapters from run folders, adapter folders, Hub ids or index ids merged into one
new adapter folder (see ``ModelAdaptersMixin.average_adapter`` for the strategies).

Everything is checked before anything is written: the sources exist and were made for one base
model, the strategy fits their method, the destination is empty (or ``force``). The folder is
written beside the destination and moved into place, so a failure leaves no half-written adapter.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .assets import resolve_model_path
from .errors import AdapterCliError
from .formats import read_adapter
from .hub import hub_access
from .locate import locate
from .model import AutoAdapterModel


@dataclass
class MergeResult:
    dest: Path
    name: str
    method: str
    sources: list[str]
    parameters: int


def merge_sources(sources: list[str], dest: Path, *, strategy: str, weights: list[float] | None = None,
                  normalize_weights: bool = True, density: float | None = None, majority_sign_method: str = "total",
                  seed: int = 0, svd_rank: int | None = None, name: str = "merged", head_from: int | None = None,
                  base_model: str | None = None, force: bool = False) -> MergeResult:
    """Merge ``sources`` into a new native adapter folder at ``dest``; ``head_from`` (1-based) copies
    that source's head onto the merged adapter (without it the folder holds no head)."""
    if len(sources) < 2:
        raise AdapterCliError("merge: give at least two adapters to merge")
    if head_from is not None and not 1 <= head_from <= len(sources):
        raise AdapterCliError(f"--head-from: {head_from} is not a source number (1 to {len(sources)})")
    if dest.is_file() or (dest.is_dir() and any(dest.iterdir()) and not force):
        raise AdapterCliError(f"--dest: {dest} already holds files; choose an empty folder or pass --force")
    folders = [locate(source) for source in sources]
    loaded = [read_adapter(folder, with_head=False) for folder in folders]
    recorded = [item.model_name for item in loaded if item.model_name]
    if len({Path(m.rstrip("/")).name for m in recorded}) > 1:
        raise AdapterCliError(f"merge: the adapters were made for different base models ({', '.join(sorted(set(recorded)))})"
                              "; they cannot be merged")
    base = base_model or (recorded[0] if recorded else None)
    if base is None:
        raise AdapterCliError("merge: the adapter files do not name their base model; pass --base-model")
    with hub_access():
        model = AutoAdapterModel.from_pretrained(resolve_model_path(base))
    names = [f"source{i + 1}" for i in range(len(sources))]
    for i, (folder, source_name) in enumerate(zip(folders, names, strict=True)):
        model.load_adapter(folder, load_as=source_name, with_head=head_from == i + 1)
    model.average_adapter(name, names, weights=weights, normalize_weights=normalize_weights,
                          combine_strategy=strategy, svd_rank=svd_rank, density=density,
                          majority_sign_method=majority_sign_method, seed=seed)
    if head_from is not None:
        source_head = names[head_from - 1]
        if source_head not in model.heads:
            raise AdapterCliError(f"--head-from: {sources[head_from - 1]} has no head to copy")
        model.add_head(name, model.heads[source_head].config)
        model.heads[name].load_state_dict(model.heads[source_head].state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as scratch:
        model.save_adapter(Path(scratch) / "adapter", name, with_head=head_from is not None)
        if dest.exists():
            shutil.rmtree(dest)
        (Path(scratch) / "adapter").rename(dest)
    record = model.adapter_state.adapters[name]
    count = sum(p.numel() for p in model.adapter_state.adapter_parameters(name).values())
    return MergeResult(dest, name, record.method, [str(s) for s in sources], count)

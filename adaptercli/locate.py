"""Where an adapter comes from, as a local folder: the one place every source name is resolved.

A source is a folder (a run folder stands for its ``adapter/``), a Hub repository id
(``org/name``, ``org/name@revision``), or an AdapterHub-style id ``task/dataset@org`` found in an
adapter index (``index=`` or $ADAPTERCLI_INDEX; its files are checked against their sha256).
"""

from __future__ import annotations

import os
from pathlib import Path

from .hub import HubError, download_adapter, is_repo_id
from .index import ID_PATTERN, INDEX_ENV, AdapterIndexError, descriptors, fetch, find, open_index


def looks_local(name: str) -> bool:
    """True for what can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``), not a Hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def local_folder(source: str | Path) -> Path | None:
    """The folder ``source`` names on this machine (a run folder: its ``adapter/``), or None when
    it names none (a Hub or index id, or a path that does not exist)."""
    path = Path(source).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path if path.exists() else None


def locate(source: str | Path, revision: str | None = None, *, index: str | Path | None = None,
           model_type: str | None = None, hidden_size: int | None = None, method: str | None = None) -> Path:
    """The local folder an adapter source stands for: a folder as it is (a run folder: its
    ``adapter/``); ``task/dataset@org`` through the index (``index`` or $ADAPTERCLI_INDEX), the one
    made for ``model_type`` / ``hidden_size`` (and with ``method``, where the id has several), its
    files checked; ``org/name`` or ``org/name@revision``
    downloaded from the Hub (``revision`` pins it too). Anything else is returned as a path, for
    the reader to report as not found."""
    local = local_folder(source)
    text = str(source)
    if local is not None or not is_repo_id(text):
        return local or Path(source).expanduser()
    index = index or os.environ.get(INDEX_ENV)
    if index and ID_PATTERN.fullmatch(text):
        folder = _from_index(text, index, model_type, hidden_size, method)
        if folder is not None:
            return folder
    try:
        return download_adapter(text, revision)
    except HubError as error:
        if ID_PATTERN.fullmatch(text) and not index:
            raise HubError(f"{error} (for an AdapterHub-style id task/dataset@org, pass index= or set "
                           f"{INDEX_ENV})") from None
        raise


def _from_index(text: str, index: str | Path, model_type: str | None, hidden_size: int | None,
                method: str | None) -> Path | None:
    """The folder of the one descriptor for ``text`` that fits the model; None when the index has none."""
    folder = open_index(index)
    listed = descriptors(folder)
    matches = find(listed, text, model_type=model_type, hidden_size=hidden_size, method=method)
    if not matches and find(listed, text):
        others = ", ".join(sorted({f"{d.model.get('type')} (hidden size {d.model.get('hidden_size')}) with {d.method}"
                                   for d in find(listed, text)}))
        wanted = f"this {model_type} model (hidden size {hidden_size})" + (f" with {method}" if method else "")
        raise AdapterIndexError(f"{text}: the index has it for {others}, not for {wanted}")
    if len(matches) > 1:
        choices = "; ".join(f"{d.model.get('name') or d.model.get('type')} {d.method}" for d in matches)
        raise AdapterIndexError(f"{text}: {len(matches)} adapters in the index fit this model ({choices}); "
                                "pick one with method=, or load its folder or repository (`adapter hub show`)")
    return fetch(matches[0], folder) if matches else None

"""Reaching the Hugging Face Hub: fail (or fall back to the local cache) in seconds, not minutes.

`huggingface_hub` and `datasets` retry an unreachable Hub for about 30 s before giving up, and they
read ``HF_HUB_OFFLINE`` once, at import. `hub_access` probes the endpoint once per process (a TCP
connection, 3 s at most) and, when it cannot be reached, runs the block in the libraries' offline
mode: files already in the cache still load, anything else fails at once with the caller's
message.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a connection; False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let the libraries try
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextmanager
def hub_access() -> Iterator[bool]:
    """Run a Hub download; yields whether the Hub is reachable. When it is not, the block runs
    in offline mode (cache only), so it fails fast instead of retrying."""
    if hub_reachable():
        yield True
        return
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved

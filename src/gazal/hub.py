"""Whether the Hugging Face hub can be reached, decided once, and loading from it without waiting.

Offline, huggingface_hub retries each request with backoff (about half a minute per file) before a
caller's fallback runs. Every hub lookup in Gazal asks `offline()` first: offline, only the local
Hugging Face cache is read (`local_files_only`), and what is not there fails at once with a
message naming the hub id and the recipe key or environment variable that points at a local copy.
Online, the libraries' ordinary calls run unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from gazal.errors import GazalError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
MODEL_ALTERNATIVE = ("point model.name_or_path at a local model folder (model.name_or_path=/path/to/model; "
                     "`gazal serve`: --model /path/to/model), or use gazal:tiny-qwen3 or gazal:smollm2-135m-instruct")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of a boolean variable


class HubUnavailable(GazalError):
    """The hub cannot be reached and what was asked for is not in the local cache."""


def offline() -> bool:
    """True when HF_HUB_OFFLINE is set, or the hub's endpoint did not accept a TCP connection.

    The environment is read on every call (it may be set after import); the probe runs once per
    process."""
    return _env_offline() or not _reachable()


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


@functools.cache
def _reachable() -> bool:
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    # Behind a proxy the endpoint itself is not reachable directly; the proxy is what must answer.
    proxy = urllib.request.getproxies().get(url.scheme) if not urllib.request.proxy_bypass(url.hostname or "") else None
    target = urllib.parse.urlsplit(proxy) if proxy else url
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    ok = _connects(host or "", port, PROBE_TIMEOUT_S)
    if not ok:
        log.info("the Hugging Face hub (%s:%d) is unreachable: hub lookups read the local cache only", host, port)
    return ok


def _connects(host: str, port: int, timeout: float) -> bool:
    # In a thread: name resolution ignores socket timeouts, and a broken resolver can stall for long.
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def is_local(name_or_path: str) -> bool:
    """True for something on this machine (a folder or file), which never needs the hub."""
    return Path(name_or_path).expanduser().exists()


def _cached(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repository id (HFValidationError): certainly not cached
        return False


def pretrained_kwargs(name_or_path: str, revision: str | None = None, filename: str = "config.json") -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a model or tokenizer: none for a local folder or when
    the hub is reachable; `local_files_only` offline when `filename` of it is in the local cache.

    Offline and not cached: HubUnavailable naming the id and the local alternatives."""
    if is_local(name_or_path) or not offline():
        return {}
    if _cached(name_or_path, filename, revision):
        return {"local_files_only": True}
    raise HubUnavailable(
        f"{name_or_path}: the Hugging Face hub is unreachable ({_why()}) and this model is not in the local "
        f"Hugging Face cache; {MODEL_ALTERNATIVE}")


def load_dataset(name: str, config: str | None, split: str, revision: str | None, data_dir: str | None,
                 alternative: str):
    """`datasets.load_dataset` of a hub id or local folder; offline, from the local cache only.

    `alternative` says how to point the recipe at a local copy (for the error message)."""
    import datasets

    if is_local(name) or not offline():
        return datasets.load_dataset(name, config, split=split, revision=revision, data_dir=data_dir)
    # datasets reads HF_HUB_OFFLINE once, at import; set its flag for this call so that it goes
    # straight to its cache instead of retrying the hub.
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision, data_dir=data_dir)
    except Exception as exc:  # noqa: BLE001 - not cached, or cached differently: either way unavailable here
        raise HubUnavailable(
            f"{name}: the Hugging Face hub is unreachable ({_why()}) and this dataset is not in the local "
            f"Hugging Face cache ({type(exc).__name__}); {alternative}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _why() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if _env_offline() else f"no connection to {constants.ENDPOINT}"

"""Offline, a hub lookup fails once and at once, naming the id and the local alternative; what is in
the local Hugging Face cache loads without touching the network."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest

from gazal import audit, benchmarks, data, hub, models
from gazal.recipes import load_recipe

MISSING_MODEL = "gazal-tests/no-such-model"
MISSING_DATASET = "gazal-tests/no-such-dataset"


@pytest.fixture
def no_network(monkeypatch, caplog):
    """Fails the test on any name lookup or hub request; afterwards, no retry was logged."""
    import huggingface_hub.file_download

    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", refuse)
    caplog.set_level(logging.INFO)
    yield
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


@pytest.fixture(params=["HF_HUB_OFFLINE", "probe"])
def offline(request, monkeypatch, no_network):
    """Offline either way: HF_HUB_OFFLINE=1 (as conftest sets), or unset with the probe finding no
    hub; then the libraries' own offline flags are cleared, so only Gazal keeps them off the network."""
    if request.param == "probe":
        import datasets
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "_reachable", lambda: False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
    return request.param


def _fails_fast(fn, *args):
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        fn(*args)
    assert time.monotonic() - start < 5
    return str(info.value)


@pytest.mark.parametrize("load", [models.load_tokenizer, models.load_model])
def test_uncached_model_fails_at_once_naming_the_alternative(offline, load):
    message = _fails_fast(load, MISSING_MODEL)
    assert MISSING_MODEL in message and "model.name_or_path=/path/to/model" in message
    assert ("HF_HUB_OFFLINE" if offline == "HF_HUB_OFFLINE" else "no connection") in message


def test_uncached_dataset_fails_at_once_naming_the_alternative(offline):
    import datasets  # noqa: F401 - imported before the clock starts

    message = _fails_fast(data.load_sft_rows, MISSING_DATASET)
    assert MISSING_DATASET in message and "data.sft.N.path=" in message


def test_uncached_benchmark_is_unavailable_at_once(offline, monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # whatever this machine cached
    message = _fails_fast(benchmarks.load_benchmark, "medqa", None)
    assert benchmarks.HUB["medqa"][0] in message and "GAZAL_BENCHMARKS_DIR" in message


def test_reward_tokenizer_falls_back_to_the_tiny_tokenizer_at_once(offline, caplog):
    tiny = models.load_tokenizer(models.resolve_model(models.TINY_QWEN3))  # built before the clock starts
    start = time.monotonic()
    tok = audit.reward_tokenizer(load_recipe("gazal-r1-32b"))
    assert time.monotonic() - start < 5
    assert tok.get_vocab() == tiny.get_vocab()
    assert any("Qwen/Qwen3-32B" in r.getMessage() and "tiny" in r.getMessage() for r in caplog.records)


def test_a_cached_hub_model_loads_offline(offline, monkeypatch, tmp_path):
    """A hub id in the local cache loads from it (local_files_only), network untouched."""
    from huggingface_hub import constants

    source = Path(models.resolve_model(models.TINY_QWEN3))
    repo = tmp_path / "hub" / "models--gazal-tests--cached-tiny"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.pretrained_kwargs("gazal-tests/cached-tiny") == {"local_files_only": True}
    tok = models.load_tokenizer("gazal-tests/cached-tiny")
    model = models.load_model("gazal-tests/cached-tiny")
    assert len(tok) == model.config.vocab_size


def test_a_cached_hub_dataset_loads_offline(offline, monkeypatch, tmp_path):
    """A hub dataset prepared into the datasets cache earlier loads from it, network untouched."""
    import datasets

    pd = pytest.importorskip("pandas")
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["A", "B"]}).to_parquet(tmp_path / "x.parquet")
    datasets.load_dataset("parquet", data_files=str(tmp_path / "x.parquet"), cache_dir=str(tmp_path / "build"),
                          split="train")
    # Laid out as datasets leaves a hub dataset it has prepared: <namespace>___<name>/<config>/<version>/<hash>.
    built = next((tmp_path / "build" / "parquet").glob("default-*/0.0.0/*/dataset_info.json")).parent
    cached = tmp_path / "cache" / "gazal-tests___cached-set" / "default" / "0.0.0" / built.name
    cached.mkdir(parents=True)
    info = json.loads((built / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    shutil.copy(built / "parquet-train.arrow", cached / "cached-set-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    ds = hub.load_dataset("gazal-tests/cached-set", None, "train", None, None, "alternative")
    assert time.monotonic() - start < 5
    assert ds["answer"] == ["A", "B"]
    assert datasets.config.HF_HUB_OFFLINE == (offline == "HF_HUB_OFFLINE")  # its flag is set back


def test_local_folders_and_online_leave_the_libraries_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.pretrained_kwargs(str(tmp_path)) == {}  # a local folder never asks the hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_reachable", lambda: True)
    assert hub.pretrained_kwargs(MISSING_MODEL) == {}  # online: the library's ordinary call


def test_probe_connects_once_per_process(monkeypatch):
    calls = []
    for var in ("HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_connects", lambda host, port, timeout: calls.append((host, port, timeout)) or False)
    hub._reachable.cache_clear()
    try:
        assert hub.offline() and hub.offline()
        assert calls == [("huggingface.co", 443, hub.PROBE_TIMEOUT_S)]
    finally:
        hub._reachable.cache_clear()


def test_connect_probe_on_this_machine():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub._connects("127.0.0.1", port, 2.0)
    start = time.monotonic()
    assert not hub._connects("127.0.0.1", port, 2.0)  # closed now: refused at once
    assert time.monotonic() - start < 2

"""RUN/manifest.json: what a run was made from, each hash checked against one computed here."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from gazal import manifest, models, report
from gazal.cli import main
from gazal.data import seed_path
from gazal.recipes import load_recipe

TINY = [
    "model.name_or_path=gazal:tiny-qwen3",
    "data.sft_limit=4",
    "sft.max_steps=1",
    "sft.max_length=1536",
    # One step that moves the weights: the merged model's hash must differ from the base's.
    "sft.learning_rate=1e-2",
    "sft.warmup_steps=0",
]
EVAL = ["eval.benchmarks=[medqa, pubmedqa]", "eval.limit=3", "eval.max_new_tokens=2", "eval.modes=[reasoning]",
        "eval.stages=[base, sft]"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _weights_sha256(folder: Path) -> str:
    """What `sha256sum *.safetensors *.bin | sha256sum` gives for the folder, computed by hand."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    return hashlib.sha256("".join(f"{_sha256(p)}  {p.name}\n" for p in files).encode()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory, benchmarks_dir):
    """SFT on a seed set and a local file, then evaluation with the benchmarks found through
    $GAZAL_BENCHMARKS_DIR (not the recipe), as the demo ran."""
    root = tmp_path_factory.mktemp("manifest")
    local = root / "cases.jsonl"
    local.write_text("\n".join(seed_path("seed:sft").read_text().splitlines()[:5]) + "\n")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GAZAL_BENCHMARKS_DIR", raising=False)
        assert main(["sft", "--config", "demo", "--run-dir", str(out), *TINY,
                     f"data.sft=[seed:sft, {{path: {local}, weight: 0.5}}]"]) == 0
        mp.setenv("GAZAL_BENCHMARKS_DIR", str(benchmarks_dir))
        assert main(["eval", "--config", "demo", "--run-dir", str(out), *TINY, *EVAL]) == 0
    return out, local


def test_manifest_replaces_versions_json(run):
    out, _ = run
    assert not (out / "versions.json").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert list(m)[:7] == ["format", *manifest.CONTEXT]
    assert list(m)[-1] == "stages"
    assert m["packages"]["trl"] and m["packages"]["peft"] and m["packages"]["transformers"]
    assert m["gazal"]["version"] == m["packages"]["gazal"]
    commit = m["gazal"]["commit"]
    assert commit is None or (len(commit) == 40 and isinstance(m["gazal"]["dirty"], bool))
    hw = m["hardware"]
    assert hw["cpus"] >= 1 and hw["processes"] == 1 and isinstance(hw["gpus"], list)
    assert m["accelerate"] is None  # not under accelerate launch
    # conftest sets these; the benchmarks came from the environment, which the recipe does not show.
    assert m["environment"]["HF_HUB_OFFLINE"] == "1" and "GAZAL_CACHE" in m["environment"]
    assert m["environment"]["GAZAL_BENCHMARKS_DIR"]


def test_sft_entry_hashes_every_data_file_and_the_base_model(run):
    out, local = run
    m = json.loads((out / "manifest.json").read_text())
    sft = m["stages"]["sft"]
    assert sft["finished"] and sft["processes"] == 1 and sft["sharding"] == "none"
    seed, mine = sft["data"]
    assert seed["source"] == "seed:sft" and Path(seed["path"]).is_absolute()
    assert seed["rows"] == 240 and seed["sha256"] == _sha256(seed["path"])
    assert mine["path"] == str(local.resolve()) and mine["rows"] == 5 and mine["sha256"] == _sha256(local)
    base = sft["base_model"]
    tiny = Path(models.resolve_model(models.TINY_QWEN3))
    assert base["name"] == "gazal:tiny-qwen3" and base["path"] == str(tiny.resolve())
    assert base["sha256"] == _weights_sha256(tiny)
    assert base["files"] == {"model.safetensors": _sha256(tiny / "model.safetensors")}
    # The eval stage ran with other overrides: the top-level recipe is eval's, and SFT keeps its own.
    assert m["recipe"]["resolved"]["eval"]["limit"] == 3
    assert sft["recipe"]["resolved"]["eval"]["limit"] == 10 and sft["recipe"]["resolved"]["data"]["sft_limit"] == 4
    assert m["recipe"]["seeds"] == {"training": 42, "data": 42, "eval_selection": 42}
    # ... and SFT ran without GAZAL_BENCHMARKS_DIR, which the top-level environment (eval's) has.
    assert "GAZAL_BENCHMARKS_DIR" not in sft["environment"]
    assert "hardware" not in sft and "packages" not in sft  # the same as the top level: not repeated


def test_eval_entry_records_benchmark_files_items_and_models(run, benchmarks_dir):
    out, _ = run
    m = json.loads((out / "manifest.json").read_text())
    ev = m["stages"]["eval"]
    assert ev["benchmarks_dir"] == {"path": str(benchmarks_dir.resolve()), "from": "GAZAL_BENCHMARKS_DIR"}
    results = json.loads((out / "eval" / "results.json").read_text())
    for name, file in (("medqa", "medqa_test.jsonl"), ("pubmedqa", "pubmedqa_test.jsonl")):
        b = ev["benchmarks"][name]
        assert b["path"] == str((benchmarks_dir / file).resolve()) and b["sha256"] == _sha256(benchmarks_dir / file)
        assert b["ids"] == results["benchmarks"][name]["selection"]["ids"] and b["evaluated"] == 3
    merged = out / "sft" / "merged"
    assert ev["base_model"]["path"] == str(merged.resolve()) and ev["base_model"]["sha256"] == _weights_sha256(merged)
    assert ev["models"]["sft"] == ev["base_model"]
    assert ev["models"]["base"]["name"] == "gazal:tiny-qwen3"
    assert ev["models"]["base"]["sha256"] == m["stages"]["sft"]["base_model"]["sha256"] != ev["base_model"]["sha256"]
    assert ev["processes"] == 1 and ev["finished"]


def test_report_shows_versions_and_commit_from_the_manifest(run):
    out, _ = run
    m = json.loads((out / "manifest.json").read_text())
    text = report.main(out).read_text()
    assert f"trl {m['packages']['trl']}" in text and f"gazal {m['gazal']['version']}" in text
    assert "`manifest.json`" in text


def test_report_of_an_older_run_reads_versions_json(tmp_path):
    import yaml

    run = tmp_path / "old"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "old", "model": {"name_or_path": "m"}}))
    (run / "versions.json").write_text(json.dumps({"python": "3.11", "trl": "0.1"}))
    assert "trl 0.1" in report.main(run).read_text()


def test_model_hash_changes_when_one_weight_changes(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tiny = Path(models.resolve_model(models.TINY_QWEN3))
    same, edited = tmp_path / "same", tmp_path / "edited"
    shutil.copytree(tiny, same)
    shutil.copytree(tiny, edited)
    weights = load_file(edited / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key][0, 0] += 1.0
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    assert not torch.equal(weights[key], load_file(same / "model.safetensors")[key])
    original = manifest.weights_digest(tiny)["sha256"]
    assert manifest.weights_digest(same)["sha256"] == original == _weights_sha256(same)
    assert manifest.weights_digest(edited)["sha256"] not in (original, None)
    # A file changed in place after it was hashed is hashed again (the cache keys on size and mtime).
    before = manifest.weights_digest(same)["sha256"]
    save_file(weights, same / "model.safetensors", metadata={"format": "pt"})
    assert manifest.weights_digest(same)["sha256"] == manifest.weights_digest(edited)["sha256"] != before
    assert manifest.weights_digest(tmp_path)["sha256"] is None  # no weight files


def test_file_hash_streams_big_files_and_is_remembered(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (3 * manifest.CHUNK // 256 + 7))  # several chunks and a tail
    expected = _sha256(path)
    assert manifest.sha256_file(path) == expected
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    assert manifest.sha256_file(path) == expected and opened == []  # the second time it is not read


def test_hub_rows_are_hashed_as_canonical_json_lines():
    rows = [{"b": 1, "a": "x"}, {"a": "y", "b": 2}]
    digest, n = manifest.sha256_rows(rows)
    by_hand = '{"a": "x", "b": 1}\n{"a": "y", "b": 2}\n'
    assert n == 2 and digest == hashlib.sha256(by_hand.encode()).hexdigest()
    assert manifest.sha256_rows(rows[::-1])[0] != digest  # order is part of the data


def test_hub_model_resolves_to_its_cached_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "a" * 40
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(Path(models.resolve_model(models.TINY_QWEN3)), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    entry = manifest.model_entry("org/tiny", "main")
    assert entry["hub_id"] == "org/tiny" and entry["revision"] == "main" and entry["commit"] == commit
    assert entry["sha256"] == _weights_sha256(snapshot)
    assert manifest.model_entry("org/absent")["sha256"] is None  # not cached: no hash, no network


def test_pubmedqa_pool_records_its_file_and_the_test_set_it_excludes(benchmarks_dir):
    recipe = load_recipe("demo", [f"eval.benchmarks_dir={benchmarks_dir}", "data.sft=pubmedqa:train",
                                  "data.grpo=pubmedqa:train"])
    for stage in ("sft", "grpo"):
        (pool,) = manifest.stage_data(stage, recipe)
        train = benchmarks_dir / "pubmedqa_train.jsonl"
        assert pool["source"] == "pubmedqa:train" and pool["path"] == str(train.resolve())
        assert pool["sha256"] == _sha256(train)
        assert pool["test_set"]["sha256"] == _sha256(benchmarks_dir / "pubmedqa_test.jsonl")
        assert pool["test_set"]["rows"] == 500


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    recipe = load_recipe("demo", ["model.name_or_path=gazal:tiny-qwen3"])
    manifest.record_stage(tmp_path, "sft", recipe, models.resolve_model(models.TINY_QWEN3))
    manifest.finish_stage(tmp_path, "sft", processes=2)
    assert not (tmp_path / "manifest.json").exists()


def test_accelerate_and_environment_are_read_from_the_launch(monkeypatch):
    import os

    for name in [k for k in os.environ if k.startswith(manifest.ACCELERATE_PREFIXES)]:
        monkeypatch.delenv(name)
    assert manifest.accelerate_env() is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    monkeypatch.setenv("ACCELERATE_CONFIG_FILE", "/x/fsdp.yaml")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert manifest.accelerate_env() == {"ACCELERATE_CONFIG_FILE": "/x/fsdp.yaml",
                                         "ACCELERATE_MIXED_PRECISION": "bf16", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}
    assert manifest.environment()["WORLD_SIZE"] == "4" and manifest.hardware()["processes"] == 4


def _moved_benchmarks(run, benchmarks_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose manifest records benchmark files in a folder of its own (copies of
    the shared ones, so the recorded hashes hold), to edit without touching ../shared."""
    out, _ = run
    copy, folder = tmp_path / "run", tmp_path / "bench"
    shutil.copytree(out, copy)
    folder.mkdir()
    m = json.loads((copy / "manifest.json").read_text())
    ev = m["stages"]["eval"]
    ev["benchmarks_dir"]["path"] = str(folder)
    for entry in ev["benchmarks"].values():
        moved = folder / Path(entry["path"]).name
        shutil.copy(entry["path"], moved)
        entry["path"] = str(moved)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy, folder


def test_later_commands_use_the_recorded_benchmarks_and_refuse_changed_ones(run, benchmarks_dir, tmp_path,
                                                                              monkeypatch, capsys):
    copy, folder = _moved_benchmarks(run, benchmarks_dir, tmp_path)
    # Without $GAZAL_BENCHMARKS_DIR, as a later shell would be: the recorded folder is used.
    monkeypatch.delenv("GAZAL_BENCHMARKS_DIR", raising=False)
    assert main(["review", "export", str(copy), "--out", str(tmp_path / "pkg"), "-n", "2"]) == 0
    assert main(["report", "--run-dir", str(copy)]) == 0
    medqa = folder / "medqa_test.jsonl"
    before = _sha256(medqa)
    medqa.write_text(medqa.read_text() + medqa.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    for args in (["report", "--run-dir", str(copy)], ["review", "export", str(copy), "--out", str(tmp_path / "pkg2"), "-n", "2"],
                 ["compare", str(run[0]), str(copy)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(medqa) in err and before in err and _sha256(medqa) in err


def test_review_export_names_the_missing_benchmark_files_not_the_samples(run, benchmarks_dir, tmp_path, monkeypatch,
                                                                         capsys):
    copy, folder = _moved_benchmarks(run, benchmarks_dir, tmp_path)
    shutil.rmtree(folder)  # the recorded files are gone, and nothing else finds them
    monkeypatch.delenv("GAZAL_BENCHMARKS_DIR", raising=False)
    monkeypatch.setattr("gazal.hub.offline", lambda: True)
    assert main(["review", "export", str(copy), "--out", str(tmp_path / "pkg"), "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "could not be found to match the samples" in err and "medqa" in err and "no evaluation samples" not in err


def test_reproduce_reruns_from_the_manifest_and_says_what_differs(tmp_path, benchmarks_dir, monkeypatch, capsys):
    from gazal.compare import compare_runs

    local = tmp_path / "cases.jsonl"
    local.write_text("\n".join(seed_path("seed:sft").read_text().splitlines()[:5]) + "\n")
    first, again = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("GAZAL_BENCHMARKS_DIR", str(benchmarks_dir))
    assert main(["run", "--config", "demo", "--run-dir", str(first), *TINY, f"data.sft={local}", "grpo.enabled=false",
                 *EVAL]) == 0
    # A later shell without the variable: the run's own environment chose the benchmarks.
    monkeypatch.delenv("GAZAL_BENCHMARKS_DIR")
    capsys.readouterr()
    assert main(["reproduce", str(first), "--run-dir", str(again)]) == 0
    out = capsys.readouterr().out
    assert "as recorded" in out and f"gazal compare {first} {again}" in out
    a, b = (json.loads((r / "manifest.json").read_text())["stages"] for r in (first, again))
    assert a["sft"]["data"] == b["sft"]["data"] and a["sft"]["base_model"]["sha256"] == b["sft"]["base_model"]["sha256"]
    assert a["eval"]["benchmarks"] == b["eval"]["benchmarks"]
    res = compare_runs(first, again)
    compared = [x for x in res["benchmarks"].values() if "skipped" not in x]
    assert compared and all(x["same_predictions"]["same"] == x["same_predictions"]["of"] == x["n"] for x in compared)
    assert all(res["benchmark_sha256"][name] for name, x in res["benchmarks"].items() if "skipped" not in x)
    for name in ("medqa", "pubmedqa"):  # the rows themselves, completions included
        assert (first / "eval" / name / "samples.jsonl").read_text() == (again / "eval" / name / "samples.jsonl").read_text()
    # Changed data is said before anything runs again.
    local.write_text(local.read_text() + local.read_text().splitlines()[0] + "\n")
    diffs = manifest.differences(first)
    assert any(str(local.resolve()) in d and _sha256(local) in d for d in diffs)


def _unfinished(copy: Path) -> None:
    """The copied run as a killed evaluation leaves it: rows written, no DONE."""
    (copy / "eval" / "DONE").unlink()


def test_a_resumed_evaluation_reads_the_recorded_benchmarks_and_refuses_changed_ones(run, benchmarks_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    copy, folder = _moved_benchmarks(run, benchmarks_dir, tmp_path)
    _unfinished(copy)
    before = json.loads((copy / "eval" / "results.json").read_text())["benchmarks"]
    # The variable now points elsewhere (an empty folder): the finished rows came from the recorded one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("GAZAL_BENCHMARKS_DIR", str(elsewhere))
    assert main(["eval", "--config", "demo", "--run-dir", str(copy), *TINY, *EVAL]) == 0
    ev = json.loads((copy / "manifest.json").read_text())["stages"]["eval"]
    assert ev["benchmarks_dir"] == {"path": str(folder.resolve()), "from": "the run's manifest (a resumed evaluation)"}
    assert {Path(b["path"]).parent for b in ev["benchmarks"].values()} == {folder.resolve()}
    assert json.loads((copy / "eval" / "results.json").read_text())["benchmarks"] == before
    # A recorded file edited before the resume: refused, naming it and both hashes.
    _unfinished(copy)
    medqa = folder / "medqa_test.jsonl"
    recorded = _sha256(medqa)
    medqa.write_text(medqa.read_text().replace("year-old", "year old"))
    capsys.readouterr()
    assert main(["eval", "--config", "demo", "--run-dir", str(copy), *TINY, *EVAL]) == 2
    err = capsys.readouterr().err
    assert str(medqa) in err and recorded in err and _sha256(medqa) in err
    # The recorded folder gone, and the file found instead differs: refused too, not merged.
    shutil.rmtree(folder)
    shutil.copytree(benchmarks_dir, elsewhere, dirs_exist_ok=True, ignore=lambda d, names: [
        n for n in names if n not in ("medqa_test.jsonl", "pubmedqa_test.jsonl")])
    changed = elsewhere / "medqa_test.jsonl"
    changed.write_text(changed.read_text().replace("year-old", "year old"))
    assert main(["eval", "--config", "demo", "--run-dir", str(copy), *TINY, *EVAL]) == 2
    err = capsys.readouterr().err
    assert str(medqa) in err and recorded in err and str(changed) in err and _sha256(changed) in err


def test_compare_pairs_only_runs_on_the_same_benchmark_data(run, tmp_path, capsys):
    out, _ = run
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    assert main(["compare", str(out), str(twin)]) == 0
    printed = capsys.readouterr().out
    recorded = json.loads((out / "manifest.json").read_text())["stages"]["eval"]["benchmarks"]
    assert "same answer in both runs: 3/3" in printed and recorded["medqa"]["sha256"][:12] in printed
    m = json.loads((twin / "manifest.json").read_text())
    m["stages"]["eval"]["benchmarks"]["medqa"]["sha256"] = "0" * 64  # as a run on an edited file records
    (twin / "manifest.json").write_text(json.dumps(m))
    assert main(["compare", str(out), str(twin)]) == 2
    err = capsys.readouterr().err
    assert "medqa" in err and recorded["medqa"]["sha256"] in err and "0" * 64 in err
    # A stage's folder of the card is paired through the run's manifest too.
    assert main(["compare", str(out / "eval" / "stages" / "base"), str(twin / "eval" / "stages" / "base")]) == 2

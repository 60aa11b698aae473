"""The stage report card's evaluation: per-stage data parallelism, the evaluation cache, direct prefill.

(The card on a real three-stage run, its paired tests against `gazal compare` and a killed card
evaluation are in test_pipeline.py.)"""

import json
import os
import shutil
import subprocess
import sys

from gazal import rundir
from gazal.cli import main
from gazal.generation import Decoding, TransformersGenerator
from gazal.models import TINY_QWEN3, resolve_model
from gazal.recipes import load_recipe

ARGS = ["model.name_or_path=gazal:tiny-qwen3", "eval.benchmarks=[medqa, pubmedqa]", "eval.limit=8",
        "eval.batch_size=2", "eval.max_new_tokens=8", "eval.modes=[reasoning, direct]", "eval.direct_max_new_tokens=3",
        "eval.generation_batch_size=null"]


def _fake_sft(run):
    """A run whose SFT stage 'finished' with a copy of the tiny model (distinct path, same weights)."""
    merged = run / "sft" / "merged"
    shutil.copytree(resolve_model(TINY_QWEN3), merged)
    rundir.finish_stage(run, "sft")


def _cmd(run, benchmarks_dir, *extra):
    return ["eval", "--config", "demo", "--run-dir", str(run), f"eval.benchmarks_dir={benchmarks_dir}", *ARGS, *extra]


def test_two_processes_evaluate_every_stage_as_one_does(tmp_path, benchmarks_dir):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    for run in (single, parallel):
        _fake_sft(run)
    assert main(_cmd(single, benchmarks_dir, "eval.stages=[base, sft]")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "gazal", *_cmd(parallel, benchmarks_dir, "eval.stages=[base, sft]")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    a = json.loads((single / "eval" / "results.json").read_text())
    b = json.loads((parallel / "eval" / "results.json").read_text())
    assert b["processes"] == 2 and a["benchmarks"] == b["benchmarks"]
    assert a["card"]["benchmarks"] == b["card"]["benchmarks"] and b["card"]["stages"] == ["base", "sft"]
    for folder in ("stages/base/medqa", "stages/base/pubmedqa/direct", "medqa", "pubmedqa/direct"):
        assert (single / "eval" / folder / "samples.jsonl").read_text() == \
            (parallel / "eval" / folder / "samples.jsonl").read_text()
        assert not list((parallel / "eval" / folder / "parts").glob("*.jsonl"))


def test_the_same_model_and_settings_are_evaluated_once(tmp_path, benchmarks_dir, monkeypatch):
    monkeypatch.setenv("GAZAL_CACHE", str(tmp_path / "cache"))
    calls = []
    real = TransformersGenerator.generate
    monkeypatch.setattr(TransformersGenerator, "generate",
                        lambda self, conv, decoding=None, seed=0: calls.append(len(conv)) or real(self, conv, decoding, seed))
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    for run in (first, second, other):
        _fake_sft(run)
    assert main(_cmd(first, benchmarks_dir, "eval.stages=[base, sft]", "eval.cache=true")) == 0
    # Two models x 2 benchmarks x 2 modes x 4 batches (SFT's copy of the base weights is generated too: the
    # cache is read before a run generates, not between its stages).
    assert len(calls) == 32
    calls.clear()
    assert main(_cmd(second, benchmarks_dir, "eval.stages=[base, sft]", "eval.cache=true")) == 0
    assert calls == []  # every row from the cache: no model was even loaded
    a = json.loads((first / "eval" / "results.json").read_text())
    b = json.loads((second / "eval" / "results.json").read_text())
    assert a["benchmarks"] == b["benchmarks"] and a["card"]["benchmarks"] == b["card"]["benchmarks"]
    for folder in ("stages/base/medqa", "pubmedqa/direct"):
        assert (first / "eval" / folder / "samples.jsonl").read_text() == \
            (second / "eval" / folder / "samples.jsonl").read_text()
    # Other decoding is another evaluation; so is a changed model.
    assert main(_cmd(other, benchmarks_dir, "eval.stages=[base, sft]", "eval.cache=true",
                     "eval.max_new_tokens=6")) == 0
    assert len(calls) == 16  # reasoning regenerated for both models; direct decoding did not change: cached
    calls.clear()
    weights = other / "sft" / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    shutil.rmtree(other / "eval")
    assert main(_cmd(other, benchmarks_dir, "eval.stages=[base, sft]", "eval.cache=true",
                     "eval.max_new_tokens=6")) == 0
    assert len(calls) == 16  # the SFT model's two modes, both benchmarks: its content changed; base cached


def test_direct_answers_are_prefilled_and_scored_with_the_prefill(benchmarks_dir):
    recipe = load_recipe("demo", [*ARGS, "eval.direct_prefill='<think>\n\n</think>\n\nThe answer is'"])
    decoding = Decoding.of(recipe.eval, "direct")
    assert decoding.prefill.endswith("The answer is") and decoding.max_new_tokens == 3
    assert Decoding.of(recipe.eval, "reasoning").prefill == ""
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    seen = []
    real = gen.model.generate

    def spy(*a, **k):
        seen.append(k["input_ids"][0].tolist())
        return real(*a, **k)

    gen.model.generate = spy  # instance attribute: the generator calls self.model.generate
    conversation = [{"role": "user", "content": "Is the sky blue?"}]
    (out,), = gen.generate([conversation], decoding)
    assert out.text.startswith(decoding.prefill) and 0 < out.tokens <= 3
    # The model continues an assistant turn that already holds the prefill.
    templated = gen.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert gen.tokenizer.decode(seen[0]) == templated + decoding.prefill
    from gazal.tasks import score

    extraction, correct = score(decoding.prefill + " yes.", "yes", ["yes", "no", "maybe"], None)
    assert extraction.label == "yes" and correct


def test_the_cache_is_keyed_on_the_benchmark_files_content(tmp_path, benchmarks_dir, monkeypatch):
    """The key holds the benchmark file's sha256 the manifest records: a copy elsewhere is the same
    evaluation, the same ids in an edited file are other questions."""
    from gazal.benchmarks import LOCAL_FILES

    monkeypatch.setenv("GAZAL_CACHE", str(tmp_path / "cache"))
    calls = []
    real = TransformersGenerator.generate
    monkeypatch.setattr(TransformersGenerator, "generate",
                        lambda self, conv, decoding=None, seed=0: calls.append(len(conv)) or real(self, conv, decoding, seed))
    copied, edited = tmp_path / "copied", tmp_path / "edited"
    for folder in (copied, edited):
        folder.mkdir()
        for name in ("medqa", "pubmedqa"):
            shutil.copy(benchmarks_dir / LOCAL_FILES[name], folder / LOCAL_FILES[name])
    medqa = edited / LOCAL_FILES["medqa"]
    medqa.write_text(medqa.read_text().replace("year-old", "year old"))  # same ids, other question texts
    runs = {name: tmp_path / name for name in ("first", "copy", "edit")}
    for run in runs.values():
        _fake_sft(run)
    assert main(_cmd(runs["first"], benchmarks_dir, "eval.stages=[base, sft]", "eval.cache=true")) == 0
    assert len(calls) == 32
    calls.clear()
    assert main(_cmd(runs["copy"], copied, "eval.stages=[base, sft]", "eval.cache=true")) == 0
    assert calls == []
    assert main(_cmd(runs["edit"], edited, "eval.stages=[base, sft]", "eval.cache=true")) == 0
    assert len(calls) == 16  # medqa again, both models and modes; pubmedqa's file is unchanged: cached
    recorded = json.loads((runs["edit"] / "manifest.json").read_text())["stages"]["eval"]["benchmarks"]
    assert recorded["medqa"]["sha256"] != json.loads((runs["first"] / "manifest.json").read_text())[
        "stages"]["eval"]["benchmarks"]["medqa"]["sha256"]

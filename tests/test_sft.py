"""SFT stage on the tiny Qwen3: loss masking, over-long rows, DoRA parameters, merge, resume, mixtures."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gazal import recipes, rundir
from gazal.cli import main
from gazal.data import load_sft_mixture
from gazal.errors import GazalError
from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model
from gazal.sft import build_trainer, drop_overlong, to_chat

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name_or_path=gazal:tiny-qwen3", "sft.max_length=1536", "sft.learning_rate=1e-2"]


def _recipe(*overrides):
    return recipes.load_recipe("demo", [*TINY, *overrides])


def _examples(n=4):
    rows, _ = load_sft_mixture(recipes.load_recipe("demo").data.sft, seed=0, limit=n)
    return [to_chat(r, None) for r in rows]


def _trainer(tmp_path, recipe, examples, validation=()):
    base = resolve_model(TINY_QWEN3)
    return build_trainer(recipe, tmp_path, base, load_tokenizer(base), list(examples), list(validation))


def test_loss_falls_only_on_the_assistant_turn(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Fever and stiff neck?"},
                         {"role": "assistant", "content": "<think>\nMeningitis until proven otherwise.\n</think>\nLumbar puncture."}],
            "where": "x"}
    examples = [to_chat(chat, "You are a careful clinician."), *_examples(1)]
    trainer = _trainer(tmp_path, _recipe("sft.per_device_train_batch_size=2"), examples)
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    seen = set()
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        text = tok.decode(ids[labels != -100])
        prompt_text = tok.decode(ids[(labels == -100) & (ids != tok.pad_token_id)])
        matching = [ex for ex in examples if ex["completion"][0]["content"] in text]
        assert len(matching) == 1, text
        ex = matching[0]
        seen.add(ex["completion"][0]["content"])
        # Exactly the assistant content (plus the end-of-turn token), none of the prompt.
        assert text.replace("<|im_end|>", "").strip() == ex["completion"][0]["content"].strip()
        assert ex["prompt"][-1]["content"] in prompt_text
        assert ex["prompt"][-1]["content"] not in text
    assert len(seen) == 2


def test_overlong_examples_are_dropped_and_counted_never_truncated():
    tok = load_tokenizer(resolve_model(TINY_QWEN3))
    short = {**to_chat({"case": "Chest pain?", "reasoning": "ECG first.", "answer": "ECG"}, None), "where": "f:1"}
    long = {**to_chat({"case": "Chest pain?", "reasoning": "word " * 2000, "answer": "ECG"}, None), "where": "f:2"}
    kept, dropped = drop_overlong([short, long], tok, 256)
    assert dropped == ["f:2"] and len(kept) == 1 and "where" not in kept[0]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_dora_adapter_trains_base_frozen_magnitudes_float32_and_merge_matches(tmp_path):
    # A bfloat16 base: the case where magnitudes would silently freeze if they were bfloat16 too.
    recipe = _recipe("model.dtype=bfloat16", "sft.max_steps=3", "sft.per_device_train_batch_size=2",
                     "sft.lora.dropout=0", "sft.save_steps=0")
    trainer = _trainer(tmp_path, recipe, _examples(6))
    before = _params(trainer.model)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    groups = {"lora_A": [], "lora_B": [], "lora_magnitude_vector": []}
    for name, p in after.items():
        changed = not torch.equal(p.detach(), before[name])
        kind = next((k for k in groups if k in name), None)
        if kind:
            groups[kind].append(changed)
            if kind == "lora_magnitude_vector":
                assert p.dtype == torch.float32, name
        else:
            assert not p.requires_grad and not changed, name  # every base weight frozen and untouched
    assert all(groups[k] and all(groups[k]) for k in groups), {k: sum(v) for k, v in groups.items()}

    # The merged model computes what the adapter model computes.
    model = trainer.model.float().eval()
    ids = trainer.processing_class(["<|im_start|>user\nCough and fever?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    with torch.no_grad():
        adapter_logits = model(ids).logits
        merged_logits = model.merge_and_unload()(ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)


KILL_AFTER = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    import gazal.sft as sft

    class Kill(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os._exit(137)  # like SIGKILL: no cleanup, no DONE, no final save

    build = sft.build_trainer
    sft.build_trainer = lambda *a, **k: build(*a, **{**k, "callbacks": [Kill()]})
    from gazal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_killed_sft_resumes_to_the_same_loss(tmp_path):
    args = ["sft", "--config", "demo", *TINY, "data.sft_limit=12", "sft.max_steps=6", "sft.save_steps=2",
            "sft.per_device_train_batch_size=2", "sft.lora.dropout=0.1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*args, "--run-dir", str(whole)]) == 0

    script = tmp_path / "kill_after.py"
    script.write_text(KILL_AFTER)
    paths = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "KILL_AT_STEP": "5", "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, str(script), *args, "--run-dir", str(killed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not rundir.is_done(killed, "sft") and (killed / "sft" / "checkpoints" / "checkpoint-4").is_dir()
    assert max(_losses(killed)) == 5

    assert main([*args, "--run-dir", str(killed), "--resume"]) == 0
    summary = json.loads((killed / "sft" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 6
    a, b = _losses(whole), _losses(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # step 5 logged once, after the resume
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    args = ["sft", "--config", "demo", *TINY, "--run-dir", str(tmp_path / "r"), "--resume"]
    assert main(args) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixture_weights_columns_formats_and_held_out_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = _write_jsonl(tmp_path / "a.jsonl", [{"vignette": f"case {i}", "cot": "r", "final": "x"} for i in range(10)])
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "b.parquet")
    recipe = recipes.load_recipe("demo", [
        f"data.sft=[{{path: {a}, weight: 2, columns: {{case: vignette, reasoning: cot, answer: final}}}}, "
        f"{{path: {tmp_path / 'b.parquet'}, weight: 0.5}}]",
        "data.sft_validation_fraction=0.25"])
    train, validation = load_sft_mixture(recipe.data.sft, recipe.seed, None, recipe.data.sft_validation_fraction)
    # a: 10 rows, 2 (round(2.5)) held out... 8 left x 2 = 16; b: 8 rows, 2 held out, half of 6 = 3.
    assert len(validation) == 4 and len(train) == 16 + 3
    assert sum("case" in r for r in train) == 16 and sum("messages" in r for r in train) == 3
    held = {r["where"] for r in validation}
    assert not held & {r["where"] for r in train}  # no row on both sides
    again, _ = load_sft_mixture(recipe.data.sft, recipe.seed, None, recipe.data.sft_validation_fraction)
    assert [r["where"] for r in again] == [r["where"] for r in train]  # seeded


@pytest.mark.parametrize(
    "rows,raw,expected",
    [
        ([{"case": "c", "answer": "a"}], None, ["d.jsonl:1", "missing field 'reasoning'"]),
        ([{"case": "c", "reasoning": ["r"], "answer": "a"}], None, ["d.jsonl:1", "'reasoning' must be a string"]),
        (None, "", ["d.jsonl", "empty"]),
        (None, '{"case": "c", "reasoning": "r", "answer": "a"}\n{"case": \n', ["d.jsonl:2", "malformed JSON"]),
        ([{"messages": [{"role": "user", "content": "q"}]}], None, ["d.jsonl:1", "last message", "assistant"]),
        ([{"messages": [{"role": "doctor", "content": "q"}]}], None, ["d.jsonl:1", "messages.0"]),
    ],
)
def test_bad_sft_data_exits_2_naming_file_line_and_field(tmp_path, capsys, rows, raw, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["sft", "--config", "demo", *TINY, f"data.sft={path}", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, err
    assert not (run / "sft" / "adapter").exists()


def test_unknown_column_mapping_is_a_recipe_error():
    with pytest.raises(GazalError, match=r"data.sft.0.columns"):
        recipes.load_recipe("demo", ["data.sft=[{path: seed:sft, columns: {question: q}}]"])


def test_packing_trains_and_packs(tmp_path):
    recipe = _recipe("sft.packing=true", "sft.max_length=2048", "sft.max_steps=2", "sft.per_device_train_batch_size=1",
                     "sft.save_steps=0")
    trainer = _trainer(tmp_path, recipe, _examples(8))
    assert len(trainer.train_dataset) < 8  # several examples share a row
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free: boundaries by position
    assert (batch["position_ids"][0] == 0).sum() > 1
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    folder = ROOT / "src" / "gazal" / "accelerate"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert names == ["deepspeed_zero3.yaml", "deepspeed_zero3_cpu.yaml", "fsdp.yaml"]
    zero3 = ClusterConfig.from_yaml_file(str(folder / "deepspeed_zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    cpu = ClusterConfig.from_yaml_file(str(folder / "deepspeed_zero3_cpu.yaml"))
    ds_file = ROOT / cpu.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3
    fsdp = ClusterConfig.from_yaml_file(str(folder / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"


def test_sft_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA, Gazal trains DDP over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gazal", "sft", "--config", "demo", *TINY,
           "data.sft_limit=8", "sft.max_steps=3", "sft.per_device_train_batch_size=2", "--run-dir", str(run)]
    # CPU processes even where a GPU exists: two ranks cannot share one GPU under NCCL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["parameters"]["frozen_tensors_changed"] == 0
    assert summary["parameters"]["trainable_tensors_changed"] == summary["parameters"]["trainable_tensors"]
    assert summary["processes"] == 2
    assert (run / "sft" / "merged" / "model.safetensors").is_file() and rundir.is_done(run, "sft")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_gpu_keeps_magnitudes_float32_and_learning(tmp_path):
    recipe = _recipe("model.dtype=bfloat16", "sft.bf16=true", "sft.max_steps=3", "sft.per_device_train_batch_size=2",
                     "sft.save_steps=0", "sft.warmup_steps=0")
    trainer = _trainer(tmp_path, recipe, _examples(6))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_magnitude_vector" in n}
    trainer.train()
    after = {n: p for n, p in trainer.model.named_parameters() if "lora_magnitude_vector" in n}
    assert after and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in after.values())
    assert all(not torch.equal(after[n].detach().cpu(), before[n].cpu()) for n in before)

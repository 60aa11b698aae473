"""Recipes: every shipped recipe validates; bad recipes fail with exit 2 naming key or file."""

import textwrap

import pytest

from gazal import config, recipes
from gazal.cli import main
from gazal.errors import GazalError


@pytest.mark.parametrize("name", sorted(recipes.shipped_recipes()))
def test_every_shipped_recipe_validates(name, capsys, monkeypatch):
    from conftest import SHARED_BENCHMARKS

    # The PubMedQA study's data is checked against the test set, which must be at hand (offline: the shared copy).
    if (SHARED_BENCHMARKS / "pubmedqa_test.jsonl").is_file():
        monkeypatch.setenv("GAZAL_BENCHMARKS_DIR", str(SHARED_BENCHMARKS))
    elif name == "pubmedqa-study":
        pytest.skip("../shared/benchmarks is not beside this checkout (the study's data needs the test set's ids)")
    assert main(["validate", "--config", name]) == 0
    assert "valid recipe" in capsys.readouterr().out


def test_shipped_recipes_start_with_their_command():
    for name, path in recipes.shipped_recipes().items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "gazal" in first and name in first


def test_every_field_is_documented():
    rows = config.explain()
    assert len(rows) > 40
    undocumented = [r for r in rows if r.rstrip().endswith(":")]
    assert not undocumented, undocumented


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("name: x\nsft:\n  learnin_rate: 1.0e-4\n", ["recipe.yaml:3", "unknown key 'sft.learnin_rate'", "sft.learning_rate"]),
        ("name: x\nbogus: 1\n", ["recipe.yaml:2", "unknown key 'bogus'"]),
        ("name: x\nsft:\n  learning_rate: fast\n", ["recipe.yaml:3", "sft.learning_rate", "valid number"]),
        ("name: x\ngrpo:\n  max_steps: [1]\n", ["grpo.max_steps", "valid integer"]),
        ("name: x\neval:\n  benchmarks: [medqa, nope]\n", ["eval.benchmarks.1"]),
        ("name: x\ndata:\n  sft: missing/train.jsonl\n", ["recipe.yaml:3", "data.sft", "missing/train.jsonl"]),
        ("name: x\neval:\n  benchmarks_dir: /no/such/dir\n", ["eval.benchmarks_dir", "/no/such/dir"]),
        ("name: x\nsft: [\n", ["recipe.yaml", "broken YAML"]),
        ("name: x\ngrpo:\n  rewards:\n    - name: nope\n", ["grpo.rewards.0", "unknown reward 'nope'"]),
        ("name: x\ngrpo:\n  rewards:\n    - name: accuracy\n      params: {scale: 2}\n", ["grpo.rewards.0", "scale"]),
        ("name: x\ngrpo:\n  num_generations: 3\n", ["grpo.num_generations"]),
        # Gating a reward on accuracy needs an accuracy component.
        ("name: x\ngrpo:\n  rewards:\n    - name: format\n    - name: overlong\n      only_when_accuracy_varies: true\n",
         ["recipe.yaml:6", "grpo.rewards.1", "only_when_accuracy_varies", "accuracy"]),
        # TRL ignores scale_rewards under normalize_then_sum: refused rather than silently dropped.
        ("name: x\ngrpo:\n  multi_objective_aggregation: normalize_then_sum\n  scale_rewards: none\n",
         ["grpo.scale_rewards", "normalize_then_sum"]),
        ("name: x\ngrpo:\n  multi_objective_aggregation: average\n", ["grpo.multi_objective_aggregation"]),
        # Evaluation: vLLM replicas need the vLLM backend; the direct instruction's only field is {what}.
        ("name: x\neval:\n  vllm_data_parallel_size: 4\n", ["recipe.yaml:3", "eval.vllm_data_parallel_size", "vllm"]),
        ("name: x\neval:\n  direct_instruction: 'say {it}'\n", ["recipe.yaml:3", "eval.direct_instruction"]),
        ("name: x\neval:\n  modes: [reasoning, recall]\n", ["eval.modes.1"]),
        ("name: x\neval:\n  preset: qwen2\n", ["recipe.yaml:3", "eval.preset"]),
        ("name: x\neval:\n  limit_strategy: random\n", ["eval.limit_strategy"]),
        ("name: x\neval:\n  preset: qwen3-thinking\n  num_samples: 4\n  temperature: 0\n", ["eval.num_samples"]),
        # A vLLM server's GPUs (for `gazal plan`) declared where vLLM is colocated; impossible sizes.
        ("name: x\ngrpo:\n  use_vllm: true\n  vllm_server_tensor_parallel_size: 4\n",
         ["recipe.yaml:4", "grpo.vllm_server_tensor_parallel_size describes", "vllm_mode colocate"]),
        ("name: x\ngrpo:\n  use_vllm: true\n  vllm_mode: server\n  vllm_tensor_parallel_size: 4\n",
         ["grpo.vllm_tensor_parallel_size", "grpo.vllm_server_tensor_parallel_size"]),
        ("name: x\ngrpo:\n  vllm_server_data_parallel_size: 0\n",
         ["grpo.vllm_server_data_parallel_size: Input should be greater than 0"]),
        ("name: x\ngrpo:\n  vllm_server_gpu_memory_utilization: 1.5\n",
         ["grpo.vllm_server_gpu_memory_utilization: Input should be less than or equal to 1"]),
        # A hub source's declared size (SFT's step estimate) must be a count.
        ("name: x\ndata:\n  sft:\n    - path: someone/sft-set\n      rows: 0\n",
         ["recipe.yaml:5", "data.sft.0.rows: Input should be greater than 0"]),
        ("name: x\ndata:\n  sft:\n    - path: someone/sft-set\n      mean_tokens: -1\n",
         ["data.sft.0.mean_tokens: Input should be greater than 0"]),
        # 2 completions per pass x 3 passes per rollout batch: not whole groups of 4.
        ("name: x\ngrpo:\n  per_device_train_batch_size: 2\n  steps_per_generation: 3\n",
         ["grpo.num_generations", "steps_per_generation"]),
    ],
)
def test_bad_recipes_exit_2_naming_the_key(tmp_path, capsys, text, expected):
    assert main(["validate", "--config", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, err


def test_overrides_apply_and_are_validated(tmp_path):
    recipe = recipes.load_recipe("demo", ["sft.learning_rate=1e-4", "eval.limit=3", "grpo.rewards.1.weight=2"])
    assert recipe.sft.learning_rate == 1e-4 and recipe.eval.limit == 3 and recipe.grpo.rewards[1].weight == 2
    with pytest.raises(GazalError, match="sft.lora.r"):
        recipes.load_recipe("demo", ["sft.lora.r=0"])
    with pytest.raises(GazalError, match="unknown key 'sft.nope'"):
        recipes.load_recipe("demo", ["sft.nope=1"])
    # A scheduler transformers would only reject once training starts is caught here, by name.
    with pytest.raises(GazalError, match="grpo.lr_scheduler_type.*'constant'"):
        recipes.load_recipe("demo", ["grpo.lr_scheduler_type=constnt"])


def test_unknown_recipe_name():
    with pytest.raises(GazalError, match="shipped"):
        recipes.load_recipe("no-such-recipe")


def test_grpo_groups_may_span_processes(monkeypatch):
    # 2 completions per process: whole groups of 4 only when two processes sample together.
    with pytest.raises(GazalError, match="processes \\(1\\)"):
        recipes.load_recipe("demo", ["grpo.per_device_train_batch_size=2", "grpo.gradient_accumulation_steps=1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert recipes.load_recipe("demo", ["grpo.per_device_train_batch_size=2", "grpo.gradient_accumulation_steps=1"]
                               ).grpo.per_device_train_batch_size == 2


def test_evaluation_shorter_than_grpo_completions_is_warned(tmp_path, caplog):
    text = "name: x\ngrpo:\n  max_completion_length: 1024\neval:\n  max_new_tokens: 512\n"
    with caplog.at_level("WARNING", logger="gazal.config"):
        assert main(["validate", "--config", _write(tmp_path, text)]) == 0
    assert "recipe.yaml:5" in caplog.text and "eval.max_new_tokens=512" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gazal.config"):
        assert main(["validate", "--config", "gazal-r1-32b"]) == 0
    assert "max_new_tokens" not in caplog.text  # the shipped recipes evaluate as long as they train

"""GRPO learns on the tiny model, and stops learning when the advantage sign, the log-prob alignment or
the merge of the rollout weights is broken (each broken once, by hand, below).

The reward ('tiny_rewards:first_token_only') pays a chosen token as the first completion token and
takes 1 back if that token comes again later. Any policy climbs it in a step or two, but only with
the credit on the position that sampled the token: a learner that reads each token's log-prob one
position late raises the token after itself, which costs. (A reward that pays the token anywhere is
climbed by that broken learner too: raising the token's probability one position late raises it
everywhere. On the shipped tiny model at temperature 0.15, '\\n' paid anywhere climbed 0.08 -> 0.48
in 20 steps with log-probs read one position late, and 0.08 -> 0.51 with them right.)

The model is gazal:tiny-qwen3 (its config, tokenizer and seed) with the output head untied and drawn
wider (std 0.4). The shipped model ties its head to embeddings of norm ~0.16 behind a final RMSNorm
of norm 8, so every logit lies within about +-1.3: no token gets past ~0.3% at temperature 1, and no
reward of this kind can be climbed. With the wider head the first token has a favourite (the chosen
token: 5-39% depending on the prompt, 20% on average).

Each run: the same 4 prompts x 8 completions of 8 tokens at every step (so step 1 is the starting
policy's reward and the later steps compare with it), 6 steps, about 5 s. Measured with seeds 42, 1,
2, 3, 7 and 11: working runs end at 0.95-0.98 (mean of the last 3 steps) from 0.03-0.19 at step 1;
broken ones end at or below 0.02, except rollouts on the base weights, which stay at the starting
policy's 0.13-0.22. The thresholds below sit between those with room on both sides.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

import gazal.adapters
from gazal.cli import main
from gazal.grpo import GazalGRPOTrainer

PROMPTS = 4
STEPS = 6
LAST = 3  # steps averaged at the end
RISE = 0.4  # a working run ends at least this far above the start
NO_RISE = 0.2  # a broken run ends below the start plus this


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the ops are tiny, and on a shared 2-core machine two threads per process
    oversubscribe the cores (a 5 s run took 50-70 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> tuple[str, int, float]:
    """The tiny Qwen3 with a wide untied head; the token the reward pays (the starting policy's
    likeliest first completion token over the test's prompts); and that token's probability of
    coming first (mean over the prompts), which bounds the starting policy's expected reward."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from gazal.data import load_grpo_items
    from gazal.models import TINY_QWEN3, resolve_model
    from gazal.recipes import load_recipe
    from gazal.tasks import messages

    src = resolve_model(TINY_QWEN3)
    out = tmp_path_factory.mktemp("peaked-tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = Qwen3Config.from_pretrained(src)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.4)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    recipe = load_recipe("demo", [f"model.name_or_path={out}"])
    texts = [tokenizer.apply_chat_template(messages(it, recipe.task), tokenize=False, add_generation_prompt=True)
             for it in load_grpo_items(recipe.data.grpo, PROMPTS)]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        probs = model.eval()(**batch).logits[:, -1].softmax(-1)
    probs[:, tokenizer.all_special_ids] = 0  # a special token first would end or garble the completion
    token = int(probs.mean(0).argmax())
    start = float(probs[:, token].mean())
    # Spread within the groups, and room to climb.
    assert 0.05 < start < 0.5, probs[:, token]
    return str(out), token, start


def _grpo(run_dir: Path, model: tuple[str, int, float], *extra: str) -> tuple[list[float], dict]:
    """Run GRPO on the first-token reward: the reward's mean at each step (step 1: the starting
    policy's rollouts), and the stage summary."""
    path, token, _ = model
    args = [
        "grpo", "--config", "demo", "--run-dir", str(run_dir),
        f"model.name_or_path={path}", "model.dtype=float32", f"data.grpo_limit={PROMPTS}",
        f"grpo.rewards=[{{name: 'tiny_rewards:first_token_only', weight: 1.0, params: {{token_id: {token}}}}}]",
        "grpo.skip_reward_audit=true",
        # Every key that shapes learning is pinned: the test must not drift with the demo recipe.
        f"grpo.max_steps={STEPS}", "grpo.learning_rate=3e-3", "grpo.lr_scheduler_type=constant",
        "grpo.warmup_steps=0", "grpo.num_generations=8", f"grpo.per_device_train_batch_size={PROMPTS * 8}",
        "grpo.gradient_accumulation_steps=1", "grpo.max_completion_length=8", "grpo.temperature=1.0",
        "grpo.top_p=1.0", "grpo.beta=0.0", "grpo.loss_type=dapo", "grpo.num_iterations=1",
        "grpo.scale_rewards=group", "grpo.lora.use_dora=true", "grpo.lora.use_rslora=true",
        "grpo.samples_every=0", "grpo.save_steps=0", "grpo.monitor.enabled=false",
        *extra,
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rewards/first_token_only/mean"] for r in rows if "loss" in r]
    assert len(rewards) == STEPS
    return rewards, json.loads((run_dir / "grpo" / "summary.json").read_text())


def _last(rewards: list[float]) -> float:
    return sum(rewards[-LAST:]) / LAST


def _assert_climbs(rewards: list[float], model) -> None:
    """The last steps' mean is RISE above step 1's (32 rollouts of the starting policy) and RISE above
    the starting policy's chance of the token first (exact, and at least its expected reward)."""
    assert _last(rewards) - rewards[0] > RISE and _last(rewards) - model[2] > RISE, (rewards, model[2])


def _assert_does_not_climb(rewards: list[float], model) -> None:
    """The last steps' mean stays below the starting policy's chance of the token first plus NO_RISE."""
    assert _last(rewards) < model[2] + NO_RISE, (rewards, model[2])


@pytest.mark.parametrize("merged", [True, False], ids=["merged-rollouts", "adapter-rollouts"])
def test_grpo_climbs_a_reward_any_policy_can_climb(peaked_model, tmp_path, merged):
    rewards, summary = _grpo(tmp_path / "run", peaked_model, f"grpo.merged_rollouts={str(merged).lower()}")
    assert summary["merged_rollout_generations"] == (STEPS if merged else 0)
    _assert_climbs(rewards, peaked_model)


def test_grpo_climbs_it_with_sampler_logprobs_as_the_old_logprobs(peaked_model, tmp_path):
    rewards, summary = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true",
                             "grpo.sampler_logprobs=true")
    assert summary["sampler_logprob_batches"] == STEPS
    _assert_climbs(rewards, peaked_model)


# --- The same runs, broken on purpose: none may climb. ----------------------------------------------


def _logps_read_at(offset: int):
    """TRL's per-token log-probs recomputed from plain logits, each completion token read from the
    distribution `offset` positions after the one that sampled it (0: the right one)."""

    def per_token_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                        compute_entropy=False, **_):
        n = logits_to_keep
        logps = (model(input_ids=input_ids, attention_mask=attention_mask).logits / self.temperature).log_softmax(-1)
        end = logps.shape[1] - 1 + offset  # position i predicts token i + 1
        read = logps[:, end - n:end]
        entropies = -(read.exp() * read).sum(-1) if compute_entropy else None
        return read.gather(-1, input_ids[:, -n:].unsqueeze(-1)).squeeze(-1), entropies, None

    return per_token_logps


@pytest.mark.parametrize("offset", [0, 1, -1], ids=["aligned", "one-late", "one-early"])
def test_log_probs_read_one_position_off_do_not_climb(peaked_model, tmp_path, monkeypatch, offset):
    # One late: the labels not shifted (each token scored by the distribution that follows it).
    # One early: shifted twice. Offset 0 is the control: the recomputation itself learns, so the
    # other two fail by their offset alone.
    monkeypatch.setattr(GazalGRPOTrainer, "_get_per_token_logps_and_entropies", _logps_read_at(offset))
    rewards, _ = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true")
    if offset == 0:
        _assert_climbs(rewards, peaked_model)
    else:
        _assert_does_not_climb(rewards, peaked_model)


def test_log_probs_shifted_against_the_completion_mask_do_not_climb(peaked_model, tmp_path, monkeypatch):
    # Each token's own log-prob, one slot early: the first token's falls off the front.
    real = GazalGRPOTrainer._get_per_token_logps_and_entropies

    def shifted(self, *args, **kwargs):
        logps, entropies, aux = real(self, *args, **kwargs)
        return torch.cat([logps[:, 1:], torch.zeros_like(logps[:, :1])], dim=1), entropies, aux

    monkeypatch.setattr(GazalGRPOTrainer, "_get_per_token_logps_and_entropies", shifted)
    rewards, _ = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true")
    _assert_does_not_climb(rewards, peaked_model)


def test_sampler_logprobs_one_token_off_do_not_climb(peaked_model, tmp_path, monkeypatch):
    # Gazal's own alignment: the sampler's log-probs (PPO's old log-probs) one token early, the
    # previous token's in each slot, as an off-by-one in the rollout's prompt length would give.
    real_logps = GazalGRPOTrainer._get_per_token_logps_and_entropies
    real_rollout = GazalGRPOTrainer._generate_single_turn
    in_rollout = []

    def logps(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if not in_rollout:
            return real_logps(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        out, entropies, aux = real_logps(self, model, input_ids, attention_mask, logits_to_keep + 1, *args, **kwargs)
        return out[:, :-1], entropies, aux

    def rollout(self, *args, **kwargs):
        in_rollout.append(True)
        try:
            return real_rollout(self, *args, **kwargs)
        finally:
            in_rollout.pop()

    monkeypatch.setattr(GazalGRPOTrainer, "_get_per_token_logps_and_entropies", logps)
    monkeypatch.setattr(GazalGRPOTrainer, "_generate_single_turn", rollout)
    rewards, summary = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true",
                             "grpo.sampler_logprobs=true")
    assert summary["sampler_logprob_batches"] == STEPS
    _assert_does_not_climb(rewards, peaked_model)


def test_a_negated_advantage_does_not_climb(peaked_model, tmp_path, monkeypatch):
    real = GazalGRPOTrainer._generate_and_score_completions

    def negated(self, inputs):
        out = real(self, inputs)
        out["advantages"] = -out["advantages"]
        return out

    monkeypatch.setattr(GazalGRPOTrainer, "_generate_and_score_completions", negated)
    rewards, _ = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true")
    _assert_does_not_climb(rewards, peaked_model)


@pytest.mark.parametrize("merge", ["base-weights", "negated-delta"])
def test_rollouts_on_wrongly_merged_weights_do_not_climb(peaked_model, tmp_path, monkeypatch, merge):
    real = gazal.adapters._merged

    @contextlib.contextmanager
    def wrong(model, **kwargs):
        if merge == "base-weights":  # the adapter left out of the rollout weights
            with model.disable_adapter():
                yield model
            return
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        with torch.no_grad():  # the adapter's update merged with the wrong sign
            for p in lora_b:
                p.neg_()
        try:
            with real(model, **kwargs) as merged:
                yield merged
        finally:
            with torch.no_grad():
                for p in lora_b:
                    p.neg_()

    monkeypatch.setattr(gazal.adapters, "_merged", wrong)
    rewards, summary = _grpo(tmp_path / "run", peaked_model, "grpo.merged_rollouts=true")
    assert summary["merged_rollout_generations"] == STEPS
    _assert_does_not_climb(rewards, peaked_model)

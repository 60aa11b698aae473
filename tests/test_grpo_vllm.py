"""GRPO with vLLM rollouts, vLLM itself replaced by a recording stand-in (no GPU, no vllm package).

TRL's `VLLMGeneration` is swapped for a fake whose server returns fixed tokens and fixed sampling
log-probs, so the test can see what reaches the loss: the old log-probs must be TRL's own forward,
the importance weight exp(old - sampler) must be applied once, and a log-prob vLLM could not give
(None) must not become NaN in the loss.
"""

import json
import math

import pytest
import torch

import trl.trainer.grpo_trainer as trl_grpo
from gazal.cli import main

from test_grpo import TINY, _copy_sft, sft_run  # noqa: F401  (the module-scoped SFT run fixture)
from vllm_stubs import RecordingClient

SAMPLED_LOGP = -2.0  # what the fake vLLM says it sampled each token with


def fake_generation(client: RecordingClient, completion: list[int], trl_syncs: list[int]):
    class FakeVLLMGeneration:
        def __init__(self, model, accelerator, processing_class, mode, **kwargs):
            self.model, self.accelerator, self.mode = model, accelerator, mode
            self.vllm_client, self.enable_sleep_mode = client, False

        def sync_weights(self):  # TRL's own sync; Gazal installs its layer-wise one in its place
            trl_syncs.append(1)

        def generate(self, prompts, images, num_generations, profiler=None):
            # One log-prob vLLM could not give (TRL maps None to NaN) in every completion.
            logprobs = [[[SAMPLED_LOGP]] * (len(completion) - 1) + [[None]] for _ in prompts]
            return prompts, [list(completion) for _ in prompts], logprobs, None

    return FakeVLLMGeneration


@pytest.fixture
def vllm_run(sft_run, tmp_path, monkeypatch):  # noqa: F811
    from gazal.grpo import GazalGRPOTrainer
    from gazal.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("gazal:tiny-qwen3"))
    completion = tok.encode("<think>\nweigh it\n</think>\n\nThe answer is A.", add_special_tokens=False)
    client, trl_syncs, seen = RecordingClient(), [], []
    monkeypatch.setattr(trl_grpo, "VLLMGeneration", fake_generation(client, completion, trl_syncs))
    original = GazalGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            learner, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].shape[1])
        loss = original(self, model, inputs)
        seen.append({k: inputs.get(k) for k in ("old_per_token_logps", "importance_sampling_ratio",
                                                  "sampling_per_token_logps", "completion_mask")}
                    | {"learner": learner, "loss": float(loss.detach())})
        return loss

    monkeypatch.setattr(GazalGRPOTrainer, "_compute_loss", spy)
    run = _copy_sft(sft_run, tmp_path / "r")
    return run, client, trl_syncs, seen


def test_vllm_rollouts_are_corrected_once_by_trls_importance_weight(vllm_run):
    # bfloat16 is where Gazal's sampler log-probs default on: the case that used to apply twice.
    run, client, trl_syncs, seen = vllm_run
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=2",
                 "model.dtype=bfloat16", "grpo.use_vllm=true", "grpo.vllm_mode=server",
                 "grpo.vllm_server_base_url=http://stub:8000",
                 # Per-token weights, so each token's correction can be checked (TRL's default is per sequence).
                 "grpo.trl={vllm_importance_sampling_mode: token_truncate}"]) == 0
    assert len(seen) == 2
    for batch in seen:
        m = batch["completion_mask"].bool()
        old, learner, sampled = batch["old_per_token_logps"], batch["learner"], batch["sampling_per_token_logps"]
        # The sampler's log-probs reached TRL (NaN where vLLM gave none) ...
        assert torch.all(sampled[m][~sampled[m].isnan()] == SAMPLED_LOGP) and sampled[m].isnan().any()
        # ... but the loss's "old" log-probs are TRL's own forward of the policy, not the sampler's.
        assert old is not None and not old[m].isnan().any()
        assert (old - learner)[m].abs().max() < 1e-2 < (old - SAMPLED_LOGP)[m].abs().min()
        # The mismatch is corrected once, by TRL's truncated importance weight; a missing log-prob is weight 1.
        ratio = batch["importance_sampling_ratio"]
        expected = torch.exp(torch.nan_to_num((old - sampled) * m, nan=0.0)).clamp(max=3.0)
        assert torch.allclose(ratio[m], expected[m], rtol=1e-4)
        assert torch.all(ratio[m][sampled[m].isnan()] == 1.0)
        assert math.isfinite(batch["loss"])
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["importance_correction"] == "trl_vllm_importance_sampling"
    assert summary["sampler_logprob_batches"] == 0 and summary["merged_rollout_generations"] == 0

    # Weights reached the server through Gazal's layer-wise sync, once per step; TRL's own never ran.
    assert trl_syncs == [] and len(client.updates) == 2 and client.resets == 2
    first, second = ({name for name, _ in tensors} for _, tensors in client.updates)
    adapted = {n for n in first if n.endswith("_proj.weight")}
    assert len(adapted) == 14 and "model.embed_tokens.weight" in first and "model.norm.weight" in first
    assert second == adapted  # frozen tensors go once per run
    metadata, tensors = client.updates[1]
    assert [m[0] for m in metadata] == [name for name, _ in tensors]
    assert summary["vllm_weight_sync"]["syncs"] == 2


def test_sampler_logprobs_with_vllm_is_refused_at_validation(capsys):
    code = main(["validate", "--config", "demo", "grpo.use_vllm=true", "grpo.sampler_logprobs=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "grpo.sampler_logprobs" in err and "twice" in err

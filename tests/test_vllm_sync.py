"""Layer-wise weight sync to vLLM: folded weights are PEFT's merge, one group whole at a time."""

import copy
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gazal.adapters import lora_config
from gazal.config import LoraSettings
from gazal.models import TINY_QWEN3, load_model, resolve_model
from gazal.vllm_sync import LayerwiseSync, folded_tensors, install, weight_metadata
from vllm_stubs import RecordingClient

TESTS = Path(__file__).resolve().parent


def _peft(dora: bool = True, dtype: str = "float32", layers: int | None = None):
    """The tiny Qwen3 with a DoRA (or LoRA) + rsLoRA adapter whose B and magnitudes are random."""
    path = resolve_model(TINY_QWEN3)
    torch.manual_seed(0)
    if layers is None:
        base = load_model(path, dtype)
    else:  # the same architecture, deeper (random weights)
        from transformers import AutoConfig, AutoModelForCausalLM

        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            path, num_hidden_layers=layers, layer_types=["full_attention"] * layers))
    cfg = lora_config(LoraSettings(r=4, alpha=8, dropout=0.0, use_dora=dora, use_rslora=True))
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # lora_B starts at zero and magnitudes at the base norms: make both matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _merged(model) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model).merge_and_unload().state_dict()


def _collect(model, frozen_sent=None) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in folded_tensors(model, frozen_sent=frozen_sent)}


def _adapted_names(model) -> set[str]:
    return {n.removeprefix("base_model.model.").replace(".base_layer", "")
            for n, _ in model.named_parameters() if "base_layer.weight" in n}


def _described(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    return [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_folded_tensors_are_peft_merge_and_frozen_ones_go_once(dora):
    model = _peft(dora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _merged(model)
    sent: set[str] = set()
    metadata = weight_metadata(model, sent)
    first = _collect(model, sent)
    # Every tensor vLLM loads, named as in the merged model; lm_head is tied to the embeddings, so
    # (as named_parameters and TRL do) it goes once, as model.embed_tokens.weight.
    assert list(first) == [n for n, _ in copy.deepcopy(model).merge_and_unload().named_parameters()]
    assert set(expected) - set(first) == {"lm_head.weight"}
    assert expected["lm_head.weight"].data_ptr() == expected["model.embed_tokens.weight"].data_ptr()
    assert len(first) == len(expected) - 1
    for name, tensor in first.items():
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape, name
        assert torch.allclose(tensor, expected[name], atol=1e-5, rtol=0), name
    assert metadata == _described(first)
    # The adapter really moved the adapted weights (else the comparison above proves little).
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (first[q] - before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]).abs().max() > 1e-3
    # Nothing in the model was written.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # Frozen tensors went once: the second sync sends the adapted weights only, in the same order.
    assert sent == set(first) - _adapted_names(model)
    metadata2 = weight_metadata(model, sent)
    second = _collect(model, sent)
    assert set(second) == _adapted_names(model) and len(second) == 14
    assert metadata2 == _described(second)
    assert list(second) == [n for n in first if n in second]
    assert all(torch.equal(second[n], first[n]) for n in second)
    # Without a set, everything every time.
    assert list(_collect(model)) == list(first)


def test_folded_tensors_follow_training():
    model = _peft()
    sent: set[str] = set()
    _collect(model, sent)
    with torch.no_grad():  # a "training step" on the adapter only
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    expected = _merged(model)
    second = _collect(model, sent)
    assert all(torch.allclose(t, expected[n], atol=1e-5, rtol=0) for n, t in second.items())


def _trl_iter(model):
    """TRL's own whole-model sync walk (gather all, merge_adapter, yield, unmerge_adapter)."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    stub = SimpleNamespace(model=model, _dist=DistributedBackend(SimpleNamespace(state=SimpleNamespace(
        deepspeed_plugin=None))))
    stub._fix_param_name_to_vllm = partial(VLLMGeneration._fix_param_name_to_vllm, stub)
    return VLLMGeneration._iter_named_params(stub)


def _collect_trl(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in _trl_iter(model)}


def test_names_and_values_are_trls_own_whole_model_sync():
    model = _peft()
    trl = _collect_trl(model)
    ours = _collect(model)
    assert list(ours) == list(trl)
    assert all(torch.allclose(ours[n], trl[n], atol=1e-5, rtol=0) for n in ours)


def test_modules_to_save_send_the_trained_copy_at_every_sync():
    # A module trained whole beside the adapter (here the final norm): vLLM gets the trained copy,
    # under the original name, at every sync; PEFT's frozen original never goes.
    path = resolve_model(TINY_QWEN3)
    torch.manual_seed(0)
    cfg = lora_config(LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg.modules_to_save = ["model.norm"]
    model = get_peft_model(load_model(path), cfg)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    expected = _merged(model)
    sent: set[str] = set()
    first = _collect(model, sent)
    assert set(expected) - set(first) == {"lm_head.weight"}
    assert torch.equal(first["model.norm.weight"], expected["model.norm.weight"])
    assert not torch.equal(first["model.norm.weight"], model.base_model.model.model.norm.original_module.weight)
    assert set(_collect(model, sent)) == _adapted_names(model) | {"model.norm.weight"}
    assert list(first) == list(_collect_trl(model))


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_bfloat16_folds_in_float32_and_matches_peft_merge(dora):
    model = _peft(dora, "bfloat16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _merged(model)
    got = _collect(model)
    # Not one bfloat16 base element rewritten (a merge and unmerge in place would round them).
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(expected) - set(got) == {"lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert {d for _, d, _ in weight_metadata(model)} == {"bfloat16"}
    for name, tensor in got.items():
        # One bfloat16 rounding apart at most (PEFT's plain-LoRA merge rounds the delta first).
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=2 ** -7, atol=1e-6, msg=name)


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora-with-bias"])
def test_fan_in_fan_out_conv1d_layers_gpt2(dora):
    # GPT-2 stores its projections as Conv1D (in, out): PEFT merges them transposed. Its decoder
    # layers are the ModuleList `transformer.h`. Plain LoRA here also trains a bias (lora_bias).
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     use_dora=dora, lora_bias=not dora, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    expected = _merged(model)
    sent: set[str] = set()
    got = _collect(model, sent)
    assert set(expected) - set(got) == {"lm_head.weight"}
    assert got["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out), as the checkpoint has it
    assert all(torch.allclose(t, expected[n], atol=1e-5, rtol=0) for n, t in got.items())
    assert weight_metadata(model) == _described(got)
    # Later syncs: the adapted weights, and the adapted biases when the adapter trains them.
    adapted = _adapted_names(model)
    if not dora:
        adapted |= {n.replace(".weight", ".bias") for n in adapted}
        bias = "transformer.h.0.attn.c_attn.bias"
        assert not torch.allclose(got[bias], base.transformer.h[0].attn.c_attn.base_layer.bias)
    assert set(_collect(model, sent)) == adapted


class LiveStorages(TorchDispatchMode):
    """Every new storage an aten op creates while active, held weakly: `live_bytes()` is how much
    of it is still allocated. Views and in-place results (storages the op was given) are not new."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0  # the most alive at once, after any op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                ref = StorageWeakRef(t.untyped_storage())
                self.storages[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
        return sum(n for _, n in self.storages.values())


def _peaks(tensors) -> tuple[int, int]:
    """Most bytes allocated by the walk and still alive at any yield (the yielded tensor included),
    and at any moment (temporaries of the fold included)."""
    at_yield = 0
    with LiveStorages() as live:
        for _, tensor in tensors():
            at_yield = max(at_yield, live.live_bytes())
            del tensor
    return at_yield, live.peak


def test_peak_grows_with_one_layer_not_the_model():
    shallow, deep = _peft(layers=2), _peft(layers=6)
    layer_bytes = sum(p.numel() * p.element_size() for n, p in deep.named_parameters()
                      if ".layers.0." in n and "base_layer.weight" in n)
    ours = [_peaks(lambda m=m: folded_tensors(m)) for m in (shallow, deep)]
    trls = [_peaks(lambda m=m: _trl_iter(m)) for m in (shallow, deep)]
    # The instrument sees a whole-model merge: TRL's merged copies grow with the depth (3x here).
    assert trls[1][0] > 2.5 * trls[0][0] and trls[1][0] > 5 * layer_bytes
    # Layer-wise: the same peaks whatever the depth, below one layer's weights (at a yield, only the
    # folded weight being yielded is alive: the largest is 128 x 64 float32).
    assert ours[0] == ours[1]
    assert ours[1][0] == 128 * 64 * 4 and ours[1][0] <= ours[1][1] < layer_bytes


def test_layerwise_sync_server_mode_streams_what_metadata_announces():
    model = _peft()
    expected = _merged(model)
    client = RecordingClient()
    gen = SimpleNamespace(mode="server", model=model, enable_sleep_mode=False,
                          accelerator=SimpleNamespace(is_main_process=True), vllm_client=client)
    sync = LayerwiseSync(gen)
    sync()
    sync()
    assert client.resets == 2 and len(client.updates) == 2 and sync.syncs == 2
    (md1, sent1), (md2, sent2) = client.updates
    assert md1 == [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in sent1]
    assert md2 == [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in sent2]
    assert len(sent1) == len(expected) - 1 and {n for n, _ in sent2} == _adapted_names(model)
    assert all(torch.allclose(t, expected[n], atol=1e-5, rtol=0) for n, t in sent1 + sent2)
    assert sync.tensors_sent == len(sent1) + len(sent2)
    assert sync.bytes_sent == sum(t.numel() * 4 for _, t in sent1 + sent2) and sync.seconds > 0

    # A rank other than the main one walks the model too (the gathers are collectives) but sends nothing.
    other = LayerwiseSync(SimpleNamespace(mode="server", model=model, enable_sleep_mode=False,
                                          accelerator=SimpleNamespace(is_main_process=False)))
    other()
    other()
    assert other.tensors_sent == sync.tensors_sent and other.frozen_sent == sync.frozen_sent


class FakeVLLM:
    """vLLM's colocated LLM as TRL's sync reaches it; `load_weights` copies into a plain model by name."""

    def __init__(self, model):
        self.model, self.loaded, self.resets, self.wakes = model, [], 0, []
        runner = SimpleNamespace(model=self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def load_weights(self, weights):
        with torch.no_grad():
            for name, tensor in weights:
                self.model.get_parameter(name).copy_(tensor)
                self.loaded.append(name)

    def reset_prefix_cache(self):
        self.resets += 1

    def wake_up(self, tags):
        self.wakes.append(tags)


@pytest.mark.parametrize("sleep", [False, True], ids=["awake", "sleep-mode"])
def test_layerwise_sync_colocate_loads_a_model_that_computes_the_policy(sleep):
    model = _peft()
    engine = load_model(resolve_model(TINY_QWEN3))  # what vLLM starts from: the base checkpoint
    with torch.no_grad():
        for p in engine.parameters():
            p.zero_()  # so a tensor that is not sent shows
    llm = FakeVLLM(engine)
    gen = SimpleNamespace(mode="colocate", model=model, enable_sleep_mode=sleep, llm=llm, _llm_weights_sleeping=sleep)
    sync = LayerwiseSync(gen)
    ids = torch.randint(0, 1000, (1, 12))
    model.eval()
    loaded = []
    for step in range(2):
        sync()
        loaded.append(llm.loaded[:])
        llm.loaded.clear()
        with torch.no_grad():
            assert torch.allclose(engine(ids).logits, model(ids).logits, atol=1e-4), step
            for name, p in model.named_parameters():  # the adapter trains; vLLM must follow
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
    # Level-2 sleep discards every weight: with sleep mode all go each time, else frozen ones once.
    assert len(loaded[0]) == 24
    assert loaded[1] == (loaded[0] if sleep else [n for n in loaded[0] if n in _adapted_names(model)])
    assert len(loaded[1]) == (24 if sleep else 14)
    assert llm.resets == 2 and llm.wakes == ([["weights"]] * 2 if sleep else [])
    assert gen._llm_weights_sleeping is False


def test_install_replaces_trls_sync_for_peft_policies_only():
    from trl.generation.vllm_generation import VLLMGeneration

    model = _peft()
    gen = object.__new__(VLLMGeneration)  # TRL's class, without starting vLLM
    gen.mode, gen.model, gen.enable_sleep_mode = "server", model, False
    gen.accelerator, gen.vllm_client = SimpleNamespace(is_main_process=True), RecordingClient()
    trainer = SimpleNamespace(use_vllm=True, vllm_generation=gen, model=model,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    sync = install(trainer)
    assert isinstance(sync, LayerwiseSync) and gen.sync_weights is sync
    gen.sync_weights()  # what TRL's trainer and generate() call
    assert sync.syncs == 1 and len(gen.vllm_client.updates) == 1
    assert install(SimpleNamespace(use_vllm=False, vllm_generation=None, model=model, accelerator=trainer.accelerator)) is None
    plain = SimpleNamespace(use_vllm=True, vllm_generation=object.__new__(VLLMGeneration),
                            model=model.get_base_model(), accelerator=trainer.accelerator)
    assert install(plain) is None and "sync_weights" not in vars(plain.vllm_generation)


def _sharded(tmp_path, mode: str) -> dict:
    """tests/sharded_sync.py under torchrun, 2 CPU processes over gloo; rank 0's findings."""
    resolve_model(TINY_QWEN3)  # built once here, not raced by two ranks
    out = tmp_path / "found.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "sharded_sync.py"), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_fsdp2_two_processes_fold_dtensor_shards_and_leave_them_exact(tmp_path):
    found = _sharded(tmp_path, "fsdp2")
    assert found["sharding"] == "fsdp2" and found["world"] == 2 and found["all_dtensor"]
    assert found["names_match"] and found["max_diff"] < 1e-5 and found["metadata_matches"]
    assert len(found["second_names"]) == 14
    assert found["shards_exact"]


def test_zero3_two_processes_fold_one_group_at_a_time(tmp_path):
    """DeepSpeed ZeRO-3 over gloo on 2 CPU processes (tests/sharded_sync.py)."""
    found = _sharded(tmp_path, "zero3")
    assert found["sharding"] == "zero3" and found["world"] == 2 and found["partitioned"]
    # Folded on partitions, equal to PEFT's merge of the unsharded copy, every tensor vLLM loads.
    assert found["names_match"] and found["expected_tied"]
    assert found["max_diff"] < 1e-5 and found["second_max_diff"] < 1e-5
    assert found["second_is_adapted"] and len(found["second_names"]) == 14
    assert found["metadata_matches"] and found["second_metadata_matches"]
    # At every yield exactly one group is gathered: the yielded tensor's, whole on the first sync
    # (frozen norms included), only the adapted layers' tensors on the second.
    for seen in found["first_seen"] + found["second_seen"]:
        assert seen["groups"] == [seen["group"]], seen
    assert all(s["available"] == s["group_params"] for s in found["first_seen"])
    # Merged rollouts inside TRL's ZeRO-3 gather: folded into the gathered buffers in place (the
    # same storage, no second copy), greedy tokens and logits those of the adapter on an unsharded
    # copy, and the partitions bit-exact afterwards.
    assert found["rollout_in_place"] == 14 and found["rollout_same_storage"] == [True]
    assert found["rollout_tokens_equal"] and found["rollout_new_tokens"] == 10
    assert found["rollout_logits_max_diff"] < 1e-4
    assert found["partitions_exact_after_rollout"] and found["partitioned_after_rollout"]
    assert {s["available"] for s in found["second_seen"]} == {28} and {s["group_params"] for s in found["second_seen"]} == {32}
    # Metadata gathered nothing; nothing stays gathered after a walk or a sync.
    assert found["available_before"] == found["available_after_metadata"] == found["available_after"] == []
    assert found["available_after_sync"] == []
    # Server mode under ZeRO-3: rank 0 streamed, rank 1 only took part in the gathers.
    assert found["client_updates"] == found["client_resets"] == 2 and found["client_metadata_matches"]
    assert found["client_first_names"] == found["first_names"] and found["client_second_names"] == found["second_names"]
    assert found["client_max_diff"] < 1e-5 and found["sync_tensors"] == 24 + 14

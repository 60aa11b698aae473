"""Weight sync to vLLM for a DoRA policy: Gazal's layer-wise sync against TRL's whole-model one.

    python bench/vllm_sync.py                       # the demo model (SmolLM2-135M, float32), one process
    python bench/vllm_sync.py --zero3               # ... and under DeepSpeed ZeRO-3 on 2 CPU processes
    python bench/vllm_sync.py --model gazal:tiny-qwen3 --rounds 1

Both sides stream into the same recording client (TRL's `VLLMClient.update_named_params`
interface: it checks the stream against the announced metadata, counts the bytes and drops each
tensor), in server mode:

  trl    TRL's own `VLLMGeneration.sync_weights`, called unbound on a stand-in with the model, a
         `DistributedBackend` and the client: `_iter_named_params` gathers every parameter
         (ZeRO-3), `merge_adapter()`, streams, `unmerge_adapter()`
         (trl/generation/vllm_generation.py, `_iter_named_params` and `sync_weights`); its first
         sync walks the model twice, once for the metadata and once to stream.
  gazal  `gazal.vllm_sync.LayerwiseSync` on the same stand-in: one decoder layer gathered and
         folded at a time; frozen tensors sent on the first sync only.

Each round runs each method in a fresh process (so one cannot leave memory to the other): a
warm-up sync on a throwaway stand-in (lazy imports), then a first sync and a later one, each timed
and with the peak extra resident memory over the sync (VmHWM, reset just before, minus the
resident set just before; glibc's mmap threshold is fixed so freed tensors leave the resident
set), then one more later sync under a torch dispatch hook that sums the bytes of every tensor the
sync allocated and still holds, net of the model's own storages freed meanwhile: the peak of torch
allocations alone. The client does not copy what it is given, so the cost of the transfer itself
(NCCL to the server) is left out of both. The adapter is the demo recipe's GRPO one (DoRA + rsLoRA,
r 16, all linear layers), with lora_B drawn at random so the merge changes every adapted weight.
One plain-path figure more: how many base-weight elements the syncs rewrote (TRL merges into the
base weights and unmerges in place; Gazal never writes them).

Measured on 2 shared CPU cores (another job running), SmolLM2-135M float32, 3 rounds: one process,
a later sync 2.3-2.5 s (TRL) against 0.29-0.32 s (Gazal), peak extra RSS +13.5 / +6.7 MiB (TRL's
merge swaps each base weight for its merged copy, so it costs little memory here), 4,904 base
elements rewritten by TRL's 4 syncs; ZeRO-3 on 2 processes, a later sync 3.7-4.1 s against
1.6-1.7 s, peak extra RSS about +527 MiB (the whole model gathered) against +21-24 MiB per rank,
and +216 MiB on Gazal's first sync (the 108 MiB embedding group, twice during gloo's all-gather).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


class RecordingClient:
    """Stands in for TRL's VLLMClient: consumes the stream, checks it against the metadata, measures it."""

    def __init__(self):
        self.tensors = self.bytes = self.resets = 0

    def update_named_params(self, metadata, tensors):
        announced = iter(metadata)
        for name, tensor in tensors:
            expected = next(announced)
            got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
            assert got == tuple(expected), (got, expected)
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
        assert next(announced, None) is None, "metadata announced more tensors than were sent"

    def reset_prefix_cache(self):
        self.resets += 1


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status")


def _live_storages(model):
    """A dispatch mode recording every storage an op allocates (weakly); `.peak` is the most bytes
    alive at once, net of the model's own storages freed meanwhile (TRL's merge swaps the base
    weights for merged copies). Views and in-place results (storages an op was given) are not new."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def refs(tensors):
        return {(r := StorageWeakRef(t.untyped_storage())).cdata: (r, t.untyped_storage().nbytes()) for t in tensors}

    class LiveStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            own = [*model.parameters(), *model.buffers()]
            self.own = refs(own + [p.ds_tensor for p in own if hasattr(p, "ds_tensor")])
            self.storages, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.storages.update(refs(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                                      and t.untyped_storage().data_ptr() not in given))
            self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
            freed = sum(n for r, n in self.own.values() if r.expired())
            self.peak = max(self.peak, sum(n for _, n in self.storages.values()) - freed)
            return out

    return LiveStorages()


def build(model_name: str):
    import torch
    from peft import get_peft_model

    from gazal import recipes
    from gazal.adapters import lora_config
    from gazal.models import load_model, resolve_model

    torch.manual_seed(0)
    settings = recipes.load_recipe("demo").grpo.lora
    model = get_peft_model(load_model(resolve_model(model_name), "float32"), lora_config(settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model, settings


def stand_in(model, zero3: bool, main: bool):
    """What TRL's VLLMGeneration holds that the syncs read, around a recording client."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3) if zero3 else None)
    gen = SimpleNamespace(mode="server", model=model, enable_sleep_mode=False, _weight_metadata=None,
                          accelerator=SimpleNamespace(is_main_process=main),
                          vllm_client=RecordingClient() if main else None,
                          _dist=DistributedBackend(SimpleNamespace(state=state)))
    gen._fix_param_name_to_vllm = partial(VLLMGeneration._fix_param_name_to_vllm, gen)
    gen._iter_named_params = partial(VLLMGeneration._iter_named_params, gen)
    return gen


def child(method: str, model_name: str, zero3: bool, out: Path) -> None:
    """One method in this process: a first sync, a later one, and a later one under the torch hook."""
    import torch

    from gazal.rundir import peak_rss_mb, reset_peak_memory

    torch.set_num_threads(1)
    rank = 0
    model, settings = build(model_name)
    if zero3:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo")
        rank = dist.get_rank()
        trainable = [p for p in model.parameters() if p.requires_grad]
        deepspeed.initialize(model=model, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                             config={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                     "train_micro_batch_size_per_gpu": 1})
    def make_sync(gen):
        if method == "trl":
            from trl.generation.vllm_generation import VLLMGeneration

            return partial(VLLMGeneration.sync_weights, gen)
        from gazal.vllm_sync import LayerwiseSync

        return LayerwiseSync(gen)

    make_sync(stand_in(model, zero3, main=rank == 0))()  # warm-up (lazy imports), on a throwaway stand-in
    gen = stand_in(model, zero3, main=rank == 0)
    sync = make_sync(gen)
    # What the syncs do to the base weights: TRL merges into them and unmerges, in place.
    bases = None if zero3 else {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    rows = []
    for which in ("first", "later", "hooked"):
        client = gen.vllm_client
        before = (client.tensors, client.bytes) if client else (0, 0)
        if zero3:
            dist.barrier()
        rss = _rss_mb()
        reset_peak_memory()
        hook = _live_storages(model) if which == "hooked" else None
        start = time.perf_counter()
        if hook:
            with hook:
                sync()
        else:
            sync()
        seconds = time.perf_counter() - start
        row = {"sync": which, "seconds": seconds, "rss_extra_mb": peak_rss_mb() - rss,
               "torch_peak_mb": hook.peak / 2**20 if hook else None}
        if client:
            row.update(tensors=client.tensors - before[0], sent_mb=(client.bytes - before[1]) / 2**20)
        rows.append(row)
    named = list(model.named_parameters())
    model_mb = sum(p.ds_numel if zero3 else p.numel() for n, p in named if "lora_" not in n) * 4 / 2**20
    changed = None if bases is None else sum(int((p != bases[n]).sum()) for n, p in named if n in bases)
    result = {"rank": rank, "rows": rows, "model_mb": model_mb, "lora": settings.model_dump(),
              "base_changed": changed}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    if zero3:
        dist.barrier()
        dist.destroy_process_group()


def run(method: str, model_name: str, zero3: bool, work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{method}.json"
    # A fixed mmap threshold: glibc then maps every allocation over 128 KiB on its own and unmaps
    # it when freed, so the resident set follows what is alive instead of what the allocator kept
    # from an earlier sync (the default threshold grows with the sizes freed).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    args = [__file__, "--child", method, "--model", model_name, "--out", str(out)] + (["--zero3"] if zero3 else [])
    if zero3:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2 if zero3 else 1)]


def _ratio(ours: float, theirs: float, floor: float) -> str:
    """ours / theirs, or n/a where theirs is too small to divide by (within noise)."""
    return f"{ours / theirs:.3f}x" if theirs >= floor else "n/a"


def report(model_name: str, zero3: bool, rounds: int) -> None:
    where = "DeepSpeed ZeRO-3, 2 CPU processes over gloo" if zero3 else "one process, plain parameters"
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            found = {m: run(m, model_name, zero3, Path(tmp) / f"{m}{r}") for m in ("trl", "gazal")}
            if r == 0:
                first = found["trl"][0]
                print(f"{model_name}, float32, {where}; base weights {first['model_mb']:.0f} MiB; adapter "
                      f"r={first['lora']['r']} alpha={first['lora']['alpha']} dora={first['lora']['use_dora']} "
                      f"rslora={first['lora']['use_rslora']} targets={first['lora']['target_modules']}")
                print("  seconds per sync; peak extra memory over the sync in MiB: resident set (VmHWM delta) "
                      "and live torch allocations; tensors and MiB streamed")
            for rank in range(len(found["trl"])):
                for i, which in enumerate(("first", "later")):
                    t, g = found["trl"][rank]["rows"][i], found["gazal"][rank]["rows"][i]
                    th, gh = found["trl"][rank]["rows"][2], found["gazal"][rank]["rows"][2]
                    sent = (f"; sent {t['tensors']} / {g['tensors']} tensors, {t['sent_mb']:.0f} / {g['sent_mb']:.0f} MiB"
                            if "tensors" in t else "")
                    torch_peak = (f"; torch peak (later sync) {th['torch_peak_mb']:.1f} / {gh['torch_peak_mb']:.1f} MiB "
                                  f"({_ratio(gh['torch_peak_mb'], th['torch_peak_mb'], 0.5)})") if which == "later" else ""
                    print(f"  round {r + 1}{f' rank {rank}' if zero3 else ''}, {which} sync, trl / gazal: "
                          f"{t['seconds']:.2f} / {g['seconds']:.2f} s ({_ratio(g['seconds'], t['seconds'], 0.01)}); "
                          f"RSS {t['rss_extra_mb']:+.1f} / {g['rss_extra_mb']:+.1f} MiB "
                          f"({_ratio(g['rss_extra_mb'], t['rss_extra_mb'], 0.5)}){torch_peak}{sent}")
            if found["trl"][0]["base_changed"] is not None:
                print(f"  round {r + 1}, base-weight elements changed by the 4 syncs (warm-up included), trl / gazal: "
                      f"{found['trl'][0]['base_changed']:,} / {found['gazal'][0]['base_changed']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zero3", action="store_true", help="also run both under ZeRO-3 on 2 CPU processes")
    parser.add_argument("--child", choices=["trl", "gazal"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.zero3, Path(args.out))
    report(args.model, False, args.rounds)
    if args.zero3:
        report(args.model, True, args.rounds)


if __name__ == "__main__":
    main()

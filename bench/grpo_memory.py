"""GRPO memory and time per phase on the demo model: before/after switches and a scaling table.

    python bench/grpo_memory.py                       # everything below (about 25 min on 2 cores)
    python bench/grpo_memory.py --only switches       # just the before/after table
    python bench/grpo_memory.py --only scaling --steps 1

Every measurement is Gazal's own GRPO stage (`gazal.grpo.main`, the demo recipe) in a fresh process,
from the base model with a fresh DoRA + rsLoRA adapter, every completion forced to exactly the
completion length (min_new_tokens), so sampling luck cannot change the work. Each phase gets the
kernel's own peak resident set (VmHWM, reset at every phase boundary) and its wall time:

  generation   TRL's `_generate_single_turn` (with Gazal's merged-weight rollouts)
  rewards      the reward functions (`_calculate_rewards`)
  scoring      the rest of `_generate_and_score_completions` (old/ref log-probs when needed, advantages)
  loss fwd     `_compute_loss`: the policy forward with TRL's fused, chunked log-prob head
  backward     `accelerator.backward`
  optimizer    the AdamW step
  save         the adapter and the merged model (a fresh base is loaded to merge into)
  other        loading, the trainer's set-up

Printed per run: seconds (exclusive, summed over the steps) and peak resident GiB per phase, and
the stage's peak; then the ratios of "before" (Gazal until this benchmark: the 4 completions in
one micro-batch, a full copy of the base weights around each merged rollout, zero-rate adapter
dropout left in place, so PEFT's DoRA computes every base projection twice) to today's demo. The scaling table gives the peak against completion length (64, 192,
512) for the tiny Qwen3 (vocabulary 1,024, 2 layers) and SmolLM2-135M (49,152, 30 layers), with
the per-token slope between lengths, so the growth law is read off, not guessed.
Target (issue 15): the demo's GRPO stage peaks at <= 4 GiB, and grows linearly in length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

PHASES = ("generation", "rewards", "scoring", "loss fwd", "backward", "optimizer", "save", "other")


class PhaseMemory:
    """Books the wall time and the kernel's peak resident set (VmHWM) to the running phase.

    The peak is reset (`/proc/self/clear_refs`) at every phase boundary and read at the next, so
    each phase gets its own exact peak with no sampling thread competing for the interpreter.
    """

    def __init__(self) -> None:
        self.phase = "other"
        self.peak: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    @staticmethod
    def hwm() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
        raise RuntimeError("no VmHWM in /proc/self/status")

    def _switch(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self.phase] += now - self._last
        self.peak[self.phase] = max(self.peak[self.phase], self.hwm())
        self._last = now
        self._reset()
        self.phase = phase

    @contextmanager
    def enter(self, phase: str):
        previous = self.phase
        self._switch(phase)
        try:
            yield
        finally:
            self._switch(previous)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with self.enter(phase):
                return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    def result(self) -> dict:
        self._switch(self.phase)
        return {"seconds": dict(self.seconds), "peak_gib": dict(self.peak)}


OLD_MERGE = '''
@contextmanager
def _merged(model, restore=True):
    # Gazal before issue 15: a full copy of every base weight around each merged rollout.
    bases = [m.base_layer.weight for m in model.modules() if isinstance(m, LoraLayer)]
    tensors = [w.data for w in bases]
    saved = [t.clone() for t in tensors] if restore else []
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for w, t in zip(bases, tensors):
                w.data = t
            for t, original in zip(tensors, saved):
                t.copy_(original)
'''


def one(spec: dict) -> dict:
    """One GRPO stage under the phase profiler; spec: model, tokens, steps, overrides, old_merge."""
    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer

    from gazal import adapters, grpo, recipes, rundir, training

    prof = PhaseMemory()
    if spec["old_merge"]:
        exec(OLD_MERGE, adapters.__dict__)  # the previous `_merged`, put back for the "before" column
    if spec.get("keep_dropout"):
        grpo.drop_inert_dropout = lambda model: 0  # PEFT's DoRA recomputes base projections, as before
    # Short scaling lengths fail the reward audit (no honest answer fits); the audit is not measured here.
    grpo.audit.check_or_refuse = lambda *a, **k: None
    trainer = grpo.GazalGRPOTrainer
    prof.wrap(trainer, "_generate_single_turn", "generation")
    prof.wrap(trainer, "_calculate_rewards", "rewards")
    prof.wrap(trainer, "_generate_and_score_completions", "scoring")
    prof.wrap(trainer, "_compute_loss", "loss fwd")
    prof.wrap(accelerate.Accelerator, "backward", "backward")
    prof.wrap(AcceleratedOptimizer, "step", "optimizer")
    prof.wrap(training, "save_adapter_and_merged", "save")
    tokens = spec["tokens"]
    overrides = [f"model.name_or_path={spec['model']}", f"grpo.max_steps={spec['steps']}",
                 f"grpo.max_completion_length={tokens}", "grpo.save_steps=1000", "grpo.samples_every=0",
                 "grpo.monitor.enabled=false",
                 # every completion exactly `tokens` long: the same work whatever is sampled
                 f"grpo.trl={{generation_kwargs: {{min_new_tokens: {tokens}}}}}", *spec["overrides"]]
    recipe = recipes.load_recipe("demo", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        rundir.prepare(run_dir, recipe)
        summary = grpo.main(recipe, run_dir)
    out = prof.result()
    out["stage_peak_gib"] = max(out["peak_gib"].values())  # VmHWM is reset per phase: the max of theirs
    assert summary["steps"] == spec["steps"]
    return out


def measure(spec: dict) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


BEFORE = {"old_merge": True, "keep_dropout": True,
          "overrides": ["grpo.per_device_train_batch_size=4", "grpo.gradient_accumulation_steps=1"]}


def switches(args) -> None:
    runs = {  # each column adds one change to the one before it
        "before": BEFORE,
        "+ one copy at merge": {**BEFORE, "old_merge": False},
        "+ no inert dropout": {**BEFORE, "old_merge": False, "keep_dropout": False},
        "+ 1 x 4 (demo now)": {"old_merge": False, "overrides": []},
        "+ grad checkpointing": {"old_merge": False, "overrides": ["grpo.gradient_checkpointing=true"]},
    }
    res = {}
    for name, run in runs.items():
        res[name] = measure({"model": args.model, "tokens": args.tokens, "steps": args.steps, **run})
        print(f"measured {name}", file=sys.stderr, flush=True)
    print(f"\nGRPO stage, {args.model}, {args.steps} step(s) of 4 completions x {args.tokens} tokens (forced)")
    head = f"{'phase':<11}" + "".join(f"{n:>22}" for n in res)
    print("\npeak resident GiB per phase\n" + head)
    for phase in PHASES:
        print(f"{phase:<11}" + "".join(f"{r['peak_gib'].get(phase, 0):>22.2f}" for r in res.values()))
    print(f"{'stage peak':<11}" + "".join(f"{r['stage_peak_gib']:>22.2f}" for r in res.values()))
    print("\nseconds per phase (exclusive, all steps)\n" + head)
    for phase in PHASES:
        print(f"{phase:<11}" + "".join(f"{r['seconds'].get(phase, 0):>22.1f}" for r in res.values()))
    train = {n: sum(r["seconds"].get(p, 0) for p in PHASES if p not in ("save", "other")) for n, r in res.items()}
    print(f"{'steps total':<11}" + "".join(f"{train[n]:>22.1f}" for n in res))
    b, a = res["before"], res["+ 1 x 4 (demo now)"]
    print(f"\nstage peak before / after: {b['stage_peak_gib'] / a['stage_peak_gib']:.2f}x "
          f"({b['stage_peak_gib']:.2f} -> {a['stage_peak_gib']:.2f} GiB; target <= 4 GiB)")
    print(f"step time after / before: {train['+ 1 x 4 (demo now)'] / train['before']:.2f}x")


def scaling(args) -> None:
    lengths = (64, 192, 512)
    print(f"\npeak resident GiB against completion length (demo recipe, {args.steps} step(s), 4 completions)")
    print("train = the loss forward and backward (one completion per micro-batch), gen = generation, "
          "stage = the whole stage (load and save included)")
    print(f"{'model':<28}{'part':>6}" + "".join(f"{n:>8}" for n in lengths) + f"{'MiB/token 64-192':>18}{'192-512':>9}")
    for model in ("gazal:tiny-qwen3", args.model):
        runs = [measure({"model": model, "tokens": n, "steps": args.steps, "old_merge": False, "overrides": []})
                for n in lengths]
        parts = {"train": [max(r["peak_gib"]["loss fwd"], r["peak_gib"]["backward"]) for r in runs],
                 "gen": [r["peak_gib"]["generation"] for r in runs],
                 "stage": [r["stage_peak_gib"] for r in runs]}
        for part, peaks in parts.items():
            # per token of one sequence: the unit whose activations are alive in the backward
            slopes = [(peaks[i + 1] - peaks[i]) * 1024 / (lengths[i + 1] - lengths[i]) for i in range(2)]
            print(f"{model:<28}{part:>6}" + "".join(f"{p:>8.2f}" for p in peaks) + f"{slopes[0]:>18.2f}{slopes[1]:>9.2f}",
                  flush=True)
    print("(slope: MiB per completion token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="GRPO steps per measurement")
    parser.add_argument("--tokens", type=int, default=None,
                        help="completion length of the switch table (default: the demo's grpo.max_completion_length)")
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct")
    parser.add_argument("--only", choices=["switches", "scaling"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.tokens is None:
        from gazal.recipes import load_recipe

        args.tokens = load_recipe("demo").grpo.max_completion_length
    if args.only != "scaling":
        switches(args)
    if args.only != "switches":
        scaling(args)


if __name__ == "__main__":
    main()

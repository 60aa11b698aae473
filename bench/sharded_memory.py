"""Host memory per process when the model is created after the training arguments (Gazal) or
before them (as Gazal did until issue 11), under DeepSpeed ZeRO-3 on 2 CPU processes.

Created after the arguments, the model loads inside `deepspeed.zero.Init` (weights partitioned as
they load); created before, every process first holds the whole model. Both runs use
`gazal sft` on the same model and data; the "before" run preloads the model in each process before
Gazal builds its SFTConfig, which is what the old order did. Each figure is a process's peak
resident memory over the SFT stage (VmHWM, reset when the stage starts), from summary.json.

    python bench/sharded_memory.py                          # the demo model, SmolLM2-135M (540 MB fp32)
    python bench/sharded_memory.py --model gazal:tiny-qwen3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "gazal" / "accelerate" / "deepspeed_zero3_cpu.yaml"

# Run by `accelerate launch` in each process: optionally load the model before any training
# arguments exist (so zero.Init cannot apply), then run the gazal CLI.
LAUNCHED = textwrap.dedent("""
    import os, sys
    import gazal.sft as sft
    if os.environ["GAZAL_BENCH_ORDER"] == "before":
        from gazal.models import load_model, resolve_model
        early = load_model(resolve_model(os.environ["GAZAL_BENCH_MODEL"]))
        sft.load_model = lambda *a, **k: early
    from gazal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run(order: str, model: str, work: Path) -> list[float]:
    work.mkdir(parents=True, exist_ok=True)
    script = work / "launched.py"
    script.write_text(LAUNCHED)
    run_dir = work / order
    env = {**os.environ, "GAZAL_BENCH_ORDER": order, "GAZAL_BENCH_MODEL": model, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port", "0",
           str(script), "sft", "--config", "demo", "--run-dir", str(run_dir), f"model.name_or_path={model}",
           "data.sft_limit=4", "sft.max_steps=2", "sft.per_device_train_batch_size=1", "sft.max_length=1024",
           "sft.save_steps=0"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert summary["sharding"] == "zero3" and summary["processes"] == 2
    return summary["peak_rss_mb_per_process"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1, help="each repeat is ~5 minutes on 2 cores")
    args = parser.parse_args()
    print(f"{args.model}: gazal sft under ZeRO-3, 2 CPU processes; peak RSS per process over the stage (MiB)")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            rows = {order: run(order, args.model, Path(tmp) / f"{order}{i}") for order in ("before", "after")}
            for order, peaks in rows.items():
                print(f"  run {i + 1}, model created {order:<6} the arguments: " + ", ".join(f"{p:,.0f}" for p in peaks))
            print(f"  run {i + 1}, after / before (rank 0, rank 1): "
                  + ", ".join(f"{a / b:.2f}x" for a, b in zip(rows["after"], rows["before"])))


if __name__ == "__main__":
    main()

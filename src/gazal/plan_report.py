"""`gazal plan`'s output: the per-stage table, what each stage lacks when it does not fit (naming the
recipe key to change), and the exit decision (`check`). The estimates themselves are `gazal.plan`'s."""

from __future__ import annotations

from gazal.errors import GazalError
from gazal.plan import GIB, Phase, Plan

# Rows that are never the key to change (they do not depend on the recipe).
_FIXED_ROWS = ("process baseline", "allocator slack", "CUDA context + NCCL")


def _row_key(stage: str, row: str, phase: Phase) -> str:
    return phase.hint.get(row) or {"sft": "sft.per_device_train_batch_size", "grpo": "grpo.per_device_train_batch_size",
                                   "eval": "eval.batch_size"}[stage]


def _where(p: Plan) -> str:
    if p.cpu:
        return "host memory"
    if p.server_gpus:
        return (f"{p.total_gpus} x {p.budget_gib:g} GiB ({p.world} training + {p.server_gpus} for the vLLM "
                f"server)")
    return f"{p.world} x {p.budget_gib:g} GiB"


def format_plan(p: Plan, config_name: str | None = None) -> str:
    """The per-stage table (GiB), what it rests on, throughput, warnings and the verdict."""
    name = config_name or p.recipe.name
    if p.cpu:
        head = (f"gazal plan: {name} on CPU, host memory (peak resident set of the stage's process) against "
                f"{p.budget_gib:.1f} GiB")
    else:
        server = f" (+ {p.server_gpus} GPU(s) for the vLLM server)" if p.server_gpus else ""
        head = (f"gazal plan: {name} on {p.nodes} node(s) x {p.gpus} GPU(s) x {p.budget_gib:g} GiB{server}, "
                f"{p.sharding} ({p.sharding_why}); GiB per GPU")
    out = [head, *("  " + line for line in p.lines), ""]
    labels: list[str] = []
    for ph in p.phases:
        labels += [r for r in ph.rows if r not in labels]
    width = max(len(r) for r in labels + ["total"]) + 2
    colw = max(12, *(len(ph.name) + 2 for ph in p.phases))
    out.append("GiB".ljust(width) + "".join(ph.name.rjust(colw) for ph in p.phases))
    for r in labels:
        cells = [f"{ph.rows[r] / GIB:.2f}" if r in ph.rows else "-" for ph in p.phases]
        out.append(r.ljust(width) + "".join(c.rjust(colw) for c in cells))
    out.append("total".ljust(width) + "".join(f"{ph.total / GIB:.2f}".rjust(colw) for ph in p.phases))
    out.append("budget".ljust(width) + "".join(f"{ph.budget / GIB:.2f}".rjust(colw) for ph in p.phases))
    out.append("verdict".ljust(width) + "".join(
        ("fits" if ph.fits else "TOO BIG").rjust(colw) if ph.enabled else "disabled".rjust(colw) for ph in p.phases))
    if any(ph.reserved is not None for ph in p.phases):
        out.append("  (vLLM's total is what it reserves: gpu_memory_utilization x the GPU)")
    if any(ph.name == "grpo server" for ph in p.phases):
        out.append("  (grpo server: per GPU of the vLLM server's own node(s); every other column: per training GPU)")
    stages: dict[str, Phase] = {}
    for ph in p.phases:
        if ph.stage not in stages or ph.total > stages[ph.stage].total:
            stages[ph.stage] = ph
    out.append("peak per stage: " + ", ".join(f"{s} {ph.total / GIB:.2f} GiB ({ph.name})" for s, ph in stages.items()))
    if p.throughput:
        out += ["", *p.throughput]
    if p.notes:
        out += ["", "notes:", *("  - " + n for n in p.notes)]
    if p.warnings:
        out += ["", "warnings (`gazal plan --strict` exits 2 on these):", *("  - " + w for w in p.warnings)]
    out += ["", "verdict: " + verdict(p, name)]
    return "\n".join(out)


def failures(p: Plan, name: str | None = None) -> list[str]:
    """Why the recipe cannot run as planned, each naming the key to change (empty: it fits)."""
    out = list(p.problems)
    unit = "of host memory" if p.cpu else "a GPU"
    for ph in p.phases:
        if not ph.enabled or ph.fits:
            continue
        row = max(ph.rows, key=lambda r: ph.rows[r] if r not in _FIXED_ROWS else -1)
        key = _row_key(ph.stage, row, ph)
        out.append(f"{ph.name} needs {ph.total / GIB:.1f} GiB {unit}, over the {ph.budget / GIB:g} GiB budget; its "
                   f"largest part is {row} ({ph.rows[row] / GIB:.1f} GiB): change {key}")
    return out


def verdict(p: Plan, name: str | None = None) -> str:
    """One line: fits, or which stages do not (the reasons are `failures`)."""
    name = name or p.recipe.name
    bad = failures(p, name)
    if not bad:
        line = f"{name} fits {_where(p)} in every enabled stage, by this estimate"
        return line + (f"; {len(p.warnings)} warning(s) above" if p.warnings else "")
    return (f"{name} does not fit {_where(p)}: "
            f"{', '.join(dict.fromkeys(b.split(' ', 1)[0].rstrip(':') for b in bad))} (what to change: below)")


def check(p: Plan, name: str | None = None, strict: bool = False) -> None:
    """Raise GazalError (exit status 2) naming the key to change when the recipe cannot fit; with
    `strict`, also when a warning stands (GPUs the plan cannot count, save/eval intervals past the
    end of SFT)."""
    name = name or p.recipe.name
    bad = failures(p, name)
    if strict:
        bad += p.warnings
    if bad:
        what = "does not fit" if failures(p, name) else "fits, but --strict refuses its warnings"
        raise GazalError(f"{name} {what}:\n  " + "\n  ".join(bad))

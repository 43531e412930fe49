"""Time and memory of every registered model at IXI size, batch 1: forward (inference) and
forward + backward (a training step's compute), each model and phase in its own process.

    .venv/bin/python scripts/bench_models.py                          # print the markdown
    .venv/bin/python scripts/bench_models.py --out docs/benchmarks.md # and rewrite its section there
    .venv/bin/python scripts/bench_models.py --size 80 96 112 --models student lkunet

How it measures:
* time: one warm-up call (not counted, reported apart as "first call"), then ``--repeats`` timed
  calls; the table gives their median. Forward runs in eval mode under ``torch.no_grad()``;
  forward + backward runs in train mode with an MSE loss between warped and fixed images and
  gradients set to None before each call, so each call allocates its gradients as training does.
  On CUDA every call is synchronised.
* peak memory: on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) of
  the worker process over the warm-up and timed calls, minus its resident size just before them
  (so the model's parameters and the inputs are not counted; activations, saved tensors,
  gradients, workspaces and allocator overhead are). Where the peak cannot be reset it falls back
  to ru_maxrss. On CUDA: torch.cuda.max_memory_allocated over the same calls, minus the memory
  allocated before them.
* out of memory: each worker may use at most --mem-limit-gb of anonymous memory (RLIMIT_DATA,
  default: what the machine has available when the worker starts, less 1 GiB), so an allocation
  beyond it fails inside the worker and is reported as "out of memory" instead of waking the
  kernel's OOM killer; a worker killed anyway (SIGKILL) is reported as such.

By default every registered model is measured (the list comes from the registry) except the
variants whose registration makes them diffeomorphic (lkunet_diff): their network is timed under
the plain variant's name; add them with --models to see the cost of the integration. The default
run takes about 10 minutes on a quiet 2-core CPU and needs about 12 GiB free (TransMorph's
forward + backward).

With --out, the results are also written as JSON next to the markdown (``docs/benchmarks.md`` ->
``docs/data/bench_models.json``; --json sets another path): the device, size, conditions and
every worker's result, which scripts/model_table.py reads for the CPU-time column of
docs/models.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from regkit.bench.machine import device_name, load_average
from regkit.bench.memory import PeakMemory, mem_available_gib, out_of_memory
from regkit.bench.report import replace_section
from regkit.bench.timing import time_calls

from regkit.data.io import atomic_write

SECTION = "bench_models"
HEADING = "## Models: time and peak memory per registration (`scripts/bench_models.py`)"
PHASES = ("forward", "train")
GiB = 1024 ** 3


# -- worker -------------------------------------------------------------------------------------
def worker(args) -> dict:
    import torch

    import regkit

    if args.mem_limit_gb:  # after the imports, so that only the measurement is capped
        limit = int(args.mem_limit_gb * GiB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = regkit.create_model(args.worker).to(device)
    moving = torch.rand(1, 1, *args.size, device=device)
    fixed = torch.rand(1, 1, *args.size, device=device)

    if args.phase == "forward":
        model.eval()

        def call():
            with torch.no_grad():
                model(moving, fixed)
    else:
        model.train()

        def call():
            model.zero_grad(set_to_none=True)
            out = model(moving, fixed)
            torch.mean((out.warped - fixed) ** 2).backward()

    with PeakMemory(device) as memory:  # over the warm-up and the timed calls
        timing = time_calls(call, args.repeats, warmup=1, device=device)
    return {"params": model.num_parameters(), "first_s": timing.first, "times_s": timing.times,
            "median_s": timing.median, "peak_bytes": memory.peak_bytes, "memory": memory.kind}


def run_worker(args) -> int:
    try:
        result = worker(args)
    except (RuntimeError, MemoryError) as exc:
        oom = out_of_memory(exc)
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        result = {"error": f"out of memory: {oom}" if oom else f"failed: {text}"}
    print(json.dumps(result))
    return 0


# -- parent -------------------------------------------------------------------------------------
def measure(name: str, phase: str, args) -> dict:
    limit = args.mem_limit_gb or max(1.0, mem_available_gib() - 1.0)
    cmd = [sys.executable, __file__, "--worker", name, "--phase", phase, "--device", args.device,
           "--repeats", str(args.repeats), "--size", *map(str, args.size),
           "--threads", str(args.threads or 0)]
    if args.device == "cpu":
        cmd += ["--mem-limit-gb", f"{limit:.2f}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == -signal.SIGKILL:
        return {"error": "killed by SIGKILL (most likely the kernel's out-of-memory killer)"}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {proc.returncode}: {tail[:200]}"}
    result = json.loads(lines[-1])
    if args.device == "cpu" and "error" in result and result["error"].startswith("out of memory"):
        result["error"] += f" (limit {limit:.1f} GiB)"
    return result


def device_line(args) -> str:
    import torch

    dev = ("" if args.device == "cuda" else "CPU ") + device_name(args.device, args.threads or None)
    load = f", load average at start {load_average():.1f}"
    return (f"Device: {dev}{load}. torch {torch.__version__}, {datetime.date.today().isoformat()}. "
            f"Input {'x'.join(map(str, args.size))}, batch 1, one channel; median of {args.repeats} "
            f"timed calls after one warm-up call.")


def fmt_s(r: dict) -> str:
    """Seconds with two decimals, or three significant digits below 0.1 s (small test inputs)."""
    if "error" in r:
        return r["error"]
    t = r["median_s"]
    return f"{t:.2f}" if t >= 0.1 else f"{t:.3g}"


def fmt_mem(r: dict) -> str:
    return "-" if "error" in r else f"{r['peak_bytes'] / GiB:.2f}"


def markdown(results: dict, args) -> str:
    ref = results.get(args.ratio_to, {}).get("forward", {})
    lines = [HEADING, "", device_line(args), "",
             f"| model | parameters | forward (s) | forward, x `{args.ratio_to}` | forward + backward (s) "
             f"| peak memory, forward (GiB) | peak memory, forward + backward (GiB) | first calls (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, phases in results.items():
        fwd, train = phases["forward"], phases["train"]
        params = next((f"{p['params']:,}" for p in (fwd, train) if "params" in p), "-")
        ratio = (f"{fwd['median_s'] / ref['median_s']:.1f}" if "median_s" in fwd and "median_s" in ref else "-")
        first = " / ".join(f"{p['first_s']:.2f}" if "first_s" in p else "-" for p in (fwd, train))
        lines.append(f"| `{name}` | {params} | {fmt_s(fwd)} | {ratio} | {fmt_s(train)} | {fmt_mem(fwd)} "
                     f"| {fmt_mem(train)} | {first} |")
    mem = {p.get("memory") for phases in results.values() for p in phases.values() if "memory" in p}
    lines += ["", f"Peak memory: {', '.join(sorted(mem)) or 'n/a'} (see the script's docstring); "
              "first calls: forward / forward + backward, not counted in the medians. Reproduce with "
              f"`{' '.join(['.venv/bin/python', 'scripts/bench_models.py'] + args.argv)}` "
              "(`--out docs/benchmarks.md` rewrites this section)."]
    return "\n".join(lines) + "\n"


def default_models() -> list:
    """Every registered model but those whose registration sets ``diffeomorphic=True``."""
    import regkit

    return [n for n in regkit.list_models() if not regkit.models.MODELS.defaults(n).get("diffeomorphic")]


def json_record(results: dict, args) -> dict:
    """What --json writes: plain data, with the markdown's conditions line."""
    import torch

    return {"format": "regkit-bench-models-v1", "device": args.device, "size": list(args.size),
            "repeats": args.repeats, "torch": str(torch.__version__), "date": datetime.date.today().isoformat(),
            "conditions": device_line(args),
            "command": " ".join(["scripts/bench_models.py"] + args.argv), "results": results}


def write_json(path: Path, record: dict) -> None:
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    help="registry names (default: every registered model but the diffeomorphic "
                         "variants such as lkunet_diff, whose network another name already times)")
    ap.add_argument("--size", nargs="+", type=int, default=[160, 192, 224], help="spatial size (D H W)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls after the warm-up call")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model and phase")
    ap.add_argument("--mem-limit-gb", type=float, default=0,
                    help="per-worker memory cap on CPU (0: available memory at start - 1 GiB)")
    ap.add_argument("--ratio-to", default="student", help="model whose forward time the ratios divide by")
    ap.add_argument("--out", type=Path, help="markdown file whose bench_models section to rewrite")
    ap.add_argument("--json", type=Path,
                    help="JSON file for the results (default with --out: data/bench_models.json next to it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)
    # The recorded command reproduces the table wherever it is written, so --out is left out.
    args.argv = [a for i, a in enumerate(argv) if not any(
        a == opt or a.startswith(opt + "=") or (i and argv[i - 1] == opt) for opt in ("--out", "--json"))]
    if args.repeats < 1 or any(s < 1 for s in args.size):
        ap.error("--repeats and --size must be positive")

    import regkit

    names = args.models or default_models()
    for name in names:
        regkit.models.MODELS.get(name)  # unknown names fail here, with the valid ones listed
    results = {}
    for name in names:
        results[name] = {}
        for phase in PHASES:
            if phase == "train" and "error" in results[name]["forward"]:
                results[name][phase] = {"error": "skipped (forward failed)"}
                continue
            t0 = time.perf_counter()
            r = measure(name, phase, args)
            results[name][phase] = r
            status = r.get("error") or f"median {r['median_s']:.2f} s, peak {r['peak_bytes'] / GiB:.2f} GiB"
            print(f"{name:>12} {phase:>7}: {status}  [{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    text = markdown(results, args)
    sys.stdout.write(text)
    if args.out:
        replace_section(args.out, SECTION, text)
        print(f"wrote {args.out}", file=sys.stderr)
    json_path = args.json or (args.out.parent / "data" / "bench_models.json" if args.out else None)
    if json_path:
        write_json(json_path, json_record(results, args))
        print(f"wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

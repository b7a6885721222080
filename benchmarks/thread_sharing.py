"""Step time of a CPU training-like workload alone, and beside a second process, with torch's default thread
count and with finetrack's sizing (processes.threads_for: an equal share of the usable cores).

    .venv/bin/python benchmarks/thread_sharing.py [--seconds 8]

Prints the time per step of each scenario and its ratio to the process alone. DESIGN.md saw 15-20x on 2 busy
cores with the default (each process runs one thread per core); an equal share should stay near 2x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from finetrack.processes import threads_for, usable_cores

WORKER = """
import json, sys, time, torch
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(64, 512)
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    steps += 1
print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - start) / steps, "threads": torch.get_num_threads()}))
"""


def run(num_processes: int, threads: int, seconds: float) -> float:
    """Mean ms per step over `num_processes` simultaneous workers with `threads` each (0: torch's default)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(seconds)], stdout=subprocess.PIPE, text=True)
        for _ in range(num_processes)
    ]
    results = [json.loads(p.communicate()[0]) for p in procs]
    return sum(r["ms_per_step"] for r in results) / len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each scenario runs")
    args = parser.parse_args()
    cores = usable_cores()
    alone = run(1, 0, args.seconds)
    rows = [
        ("alone (default threads)", alone),
        ("2 processes, default threads", run(2, 0, args.seconds)),
        (f"2 processes, {threads_for(cores, 2)} thread(s) each (finetrack)", run(2, threads_for(cores, 2), args.seconds)),
    ]
    print(f"{cores} usable cores")
    for name, ms in rows:
        print(f"{name:48s} {ms:8.1f} ms/step  {ms / alone:5.2f}x alone")


if __name__ == "__main__":
    main()

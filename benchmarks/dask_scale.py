"""Dask scaling of lowrank_fusion: throughput and peak memory per worker vs batch and workers.

Run: ``python benchmarks/dask_scale.py [--rows 250000 500000 1000000] [--workers 1 2] [--json FILE]``

Each configuration gets a fresh ``LocalCluster`` (worker processes, one thread each); the
batch is generated chunk by chunk on the workers (examples/dask_distributed_fusion.py), fused
and reduced to its mean.  Peak memory per worker is the workers' RSS high-water mark (VmHWM),
so a flat column as rows grow shows that no worker holds more than a few chunks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, print_table

import mmfuse


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "dask_distributed_fusion.py"
    spec = importlib.util.spec_from_file_location("dask_distributed_fusion", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    return module


def _peak_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(rows: int, workers: int, chunk: int, params: dict, ex) -> dict:
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        base = max(client.run(_peak_mib).values())
        _, mean = ex.fused_mean(rows, chunk, params)
        t0 = time.perf_counter()
        mean.compute()
        seconds = time.perf_counter() - t0
        peak = max(client.run(_peak_mib).values())
    gib = rows * sum(ex.DIMS) * 4 / 2**30
    return {
        "rows": rows,
        "workers": workers,
        "input_gib": gib,
        "seconds": seconds,
        "mrows_per_s": rows / seconds / 1e6,
        "peak_worker_mib": peak,
        "idle_worker_mib": base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk", type=int, default=25_000)
    parser.add_argument("--json")
    args = parser.parse_args()
    ex = _example()
    params = mmfuse.init_lowrank(ex.DIMS, rank=16, out_dim=128, seed=0, dtype=np.float32)
    print(f"machine: {machine()}")
    results = [run(r, w, args.chunk, params, ex) for w in args.workers for r in args.rows]
    rows = [
        {
            "workers": r["workers"],
            "rows": r["rows"],
            "input GiB": f"{r['input_gib']:.2f}",
            "s": f"{r['seconds']:.2f}",
            "Mrows/s": f"{r['mrows_per_s']:.2f}",
            "peak MiB/worker": f"{r['peak_worker_mib']:.0f}",
            "idle MiB/worker": f"{r['idle_worker_mib']:.0f}",
        }
        for r in results
    ]
    print_table(rows, ["workers", "rows", "input GiB", "s", "Mrows/s", "peak MiB/worker", "idle MiB/worker"])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

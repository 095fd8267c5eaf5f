"""Data-parallel training of ``mmfuse.nn.LowRankFusion`` and ``mmfuse.nn.WanderAdapter`` with
DistributedDataParallel on CPU.

Two processes (gloo backend, ``torch.multiprocessing.spawn``) each take half of every batch;
DDP averages their gradients, so each step equals one step on the full batch in one process.
The script checks exactly that at the end (exit status 1 if parameters or gradients differ by more
than ``--tol``), for both layers.  At this script's sizes (8 samples per process) both layers
run as plain torch operations under autograd, mmfuse's small-problem paths
(docs/backends.rst, "Small problems"); larger batches run mmfuse's custom ops, whose analytic
backwards accumulate into the parameters' ``.grad`` as any operator's do, which is all DDP's
gradient hooks see.

Run: ``python examples/ddp_lowrank.py [--world-size 2] [--steps 5] [--model lowrank|wander|both]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mmfuse.nn import LowRankFusion, WanderAdapter

DIMS, OUT_DIM, RANK, BATCH = (6, 4, 5), 3, 4, 16
# WanderAdapter: token counts, width d (every modality, for the residual), r, R_h, R_t
LENGTHS, WIDTH, W_RANK, FEATURE_RANK, TOKEN_RANK = (5, 3, 4), 4, 3, 2, 2
MODELS = ("lowrank", "wander")


def make_model(kind: str = "lowrank") -> torch.nn.Module:
    torch.manual_seed(0)  # every process starts from the same parameters
    if kind == "wander":
        return WanderAdapter((WIDTH,) * len(LENGTHS), LENGTHS, W_RANK, FEATURE_RANK, TOKEN_RANK)
    return LowRankFusion(DIMS, OUT_DIM, RANK)


def make_data(steps: int, kind: str = "lowrank") -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if kind == "wander":
        return [
            ([torch.randn(BATCH, t, WIDTH, generator=g) for t in LENGTHS],
             torch.randn(BATCH, W_RANK, WIDTH, generator=g))
            for _ in range(steps)
        ]  # fmt: skip
    return [
        ([torch.randn(BATCH, d, generator=g) for d in DIMS], torch.randn(BATCH, OUT_DIM, generator=g))
        for _ in range(steps)
    ]


def train(model: torch.nn.Module, data, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """SGD steps on this rank's share of each batch; returns the last step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = BATCH // world_size
    rows = slice(rank * per, (rank + 1) * per)
    for xs, target in data:
        opt.zero_grad()
        out = model([x[rows] for x in xs])
        loss = torch.nn.functional.mse_loss(out, target[rows])  # mean over this rank's rows
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def worker(
    rank: int, world_size: int, init_file: str, steps: int, result: str, kind: str = "lowrank"
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _train_and_save(rank, world_size, steps, result, kind)
        # Teardown in a fixed order.  The DDP model (whose reducer holds the process group)
        # is gone once _train_and_save returns, collected here if a reference cycle kept it;
        # then both ranks leave together.  A rank tearing gloo down while its peer was still
        # in a collective's cleanup, or gloo's threads destroyed during interpreter shutdown,
        # aborted a child in CI ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_and_save(rank: int, world_size: int, steps: int, result: str, kind: str) -> None:
    model = DistributedDataParallel(make_model(kind))
    grads = train(model, make_data(steps, kind), rank, world_size)
    if rank == 0:
        state = dict(model.module.state_dict())
        state.update({"grad." + name.removeprefix("module."): g for name, g in grads.items()})
        torch.save(state, result)


def run_ddp(world_size: int, steps: int, workdir: str, kind: str = "lowrank") -> dict[str, torch.Tensor]:
    init_file = os.path.join(workdir, f"init-{kind}")
    result = os.path.join(workdir, f"state-{kind}.pt")
    mp.spawn(worker, args=(world_size, init_file, steps, result, kind), nprocs=world_size, join=True)
    return torch.load(result, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--tol", type=float, default=1e-5, help="max abs difference allowed (default 1e-5)")
    args = parser.parse_args()
    if args.world_size < 1 or BATCH % args.world_size:
        parser.error(
            f"--world-size must divide the batch of {BATCH} rows (1, 2, 4, 8 or 16), got {args.world_size}: "
            "otherwise rows would be dropped and DDP would not equal the full-batch step"
        )
    failed = []
    for kind in MODELS if args.model == "both" else (args.model,):
        with tempfile.TemporaryDirectory() as tmp:
            ddp_state = run_ddp(args.world_size, args.steps, tmp, kind)
        single = make_model(kind)
        grads = train(single, make_data(args.steps, kind))
        worst = max((ddp_state[k] - v).abs().max().item() for k, v in single.state_dict().items())
        worst_g = max((ddp_state["grad." + k] - g).abs().max().item() for k, g in grads.items())
        print(
            f"{kind}: {args.world_size} processes vs 1 process on the full batch: "
            f"max |param diff| = {worst:.2e}, max |grad diff| = {worst_g:.2e}"
        )
        if not max(worst, worst_g) <= args.tol:
            failed.append(kind)
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)} differ from the single-process run by more than {args.tol:g}")


if __name__ == "__main__":
    main()

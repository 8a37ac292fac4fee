"""Train a small MLP with DistributedDataParallel, resumable from a checkpoint.

A plain torchrun script: it reads RANK / LOCAL_RANK / WORLD_SIZE from the environment and
initialises torch.distributed from it, so it runs unchanged under either launcher::

    torchrun --standalone --nproc-per-node 4 examples/train_mlp.py --epochs 3
    ddp-launch -n 4 examples/train_mlp.py --epochs 3

The data is made up on the spot, no download: a fixed random "teacher" network labels random
inputs, and the student learns to imitate it, so the accuracy really rises.

With ``--checkpoint PATH`` the run saves its state every ``--checkpoint-every`` steps and, when
started again, continues from the last save where it stopped, mid-epoch included. The final
parameters then match, bit for bit, those of a run that was never interrupted (same seed and
world size); ``--print-digest`` prints a hash of them on every rank to check that.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    from ddp_launch import checkpoint, report
except ImportError:  # ddp-launch not installed: no live progress, plain torch checkpoints, no snapshots
    checkpoint = None

    def report(**metrics: float) -> None:
        pass


IN_FEATURES, HIDDEN, CLASSES = 784, 256, 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--checkpoint", metavar="PATH", help="save to / resume from this file")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="steps between saves")
    p.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="with --checkpoint under ddp-launch, do not keep an in-memory snapshot after every step",
    )
    p.add_argument(
        "--snapshot-budget",
        type=float,
        default=0.03,
        metavar="SHARE",
        help="the share of the loop's time snapshots may take (0: a snapshot of every step)",
    )
    p.add_argument("--samples", type=int, default=4096, help="size of the synthetic dataset")
    p.add_argument("--loader-workers", type=int, default=0, metavar="N", help="DataLoader worker processes per rank")
    p.add_argument("--print-digest", action="store_true", help="print a sha256 of the final parameters")
    return p.parse_args()


def pick_backend() -> str:
    requested = os.environ.get("DDP_LAUNCH_BACKEND")
    if requested in ("gloo", "nccl"):
        return requested
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


def make_dataset(n: int, seed: int) -> TensorDataset:
    # Built from its own generator, so every rank (and every restart) gets the same data
    # without touching the global RNG.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    w1 = torch.randn(IN_FEATURES, 64, generator=g) / IN_FEATURES**0.5
    w2 = torch.randn(64, CLASSES, generator=g) / 64**0.5
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    # No dropout or other randomness in the training path: a resumed run must repeat the
    # uninterrupted one exactly.
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def load_checkpoint(path: str) -> dict | None:
    if checkpoint is not None:
        return checkpoint.load(path)
    return torch.load(path, map_location="cpu") if os.path.exists(path) else None


def save_checkpoint(state: dict, path: str) -> None:
    if checkpoint is not None:
        checkpoint.save(state, path)
        return
    # Same idea as ddp_launch.checkpoint.save: never leave a half-written file under `path`.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def settle_gradient_buckets(ddp_model: DistributedDataParallel, data: TensorDataset, device: torch.device) -> None:
    """One throwaway forward/backward, so that every run trains on DDP's final bucket layout.

    DDP reorders its gradient buckets after the first backward. With more than two ranks the
    layout changes the order in which the all-reduce adds floating-point numbers, so without
    this the first step after a resume would differ in the last bits from the same step of an
    uninterrupted run. The gradients are thrown away; parameters and RNG are untouched.
    """
    x, y = data.tensors[0][:1].to(device), data.tensors[1][:1].to(device)
    nn.functional.cross_entropy(ddp_model(x), y).backward()
    ddp_model.zero_grad(set_to_none=True)


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, device: torch.device) -> tuple[float, float]:
    x, y = data.tensors[0].to(device), data.tensors[1].to(device)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def main() -> None:
    args = parse_args()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])

    backend = pick_backend()
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    if rank == 0:
        print(f"training on {world_size} ranks, backend {backend}", flush=True)

    data = make_dataset(args.samples, args.seed)
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    workers = max(0, args.loader_workers)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)  # fmt: skip
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)

    torch.manual_seed(args.seed)
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    start_epoch, start_batch, global_step = 0, 0, 0
    state = load_checkpoint(args.checkpoint) if args.checkpoint else None
    if state is not None:
        # Restored before DDP wraps the model: DDP broadcasts rank 0's parameters at
        # construction, and every rank has read the same file anyway.
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # momentum buffers included
        start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["step"]
        if (state["world_size"], state["batch_size"]) != (world_size, args.batch_size):
            # The batch index within the epoch means something else now; convert by samples.
            # The run goes on, but is no longer bit-identical to an uninterrupted one.
            done = start_batch * state["world_size"] * state["batch_size"]
            start_batch = min(done // (world_size * args.batch_size), steps_per_epoch)
        if rank == 0:
            source = checkpoint.loaded_from() if checkpoint is not None else args.checkpoint
            print(f"resuming from {source}: epoch {start_epoch} step {global_step}", flush=True)
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if backend == "nccl" else None)
    settle_gradient_buckets(ddp_model, data, device)

    # Where the next step starts: (epoch, batch index within it). Saved with the model, so a
    # restart continues mid-epoch instead of redoing (or dropping) the batches since the save.
    position = (start_epoch, start_batch)

    def state_now() -> dict:
        epoch, batch = position
        if batch == steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": global_step,
            "world_size": world_size,
            "batch_size": args.batch_size,
        }

    def save() -> None:
        save_checkpoint(state_now(), args.checkpoint)

    # Only rank 0 saves, and no barrier follows: after every step all ranks hold the same
    # parameters (DDP averages the gradients), so rank 0's copy is the whole world's state, and
    # nobody reads the file before the next start of the whole group. The save is atomic, so a
    # crash mid-save leaves the previous checkpoint; a barrier would only make every rank wait
    # for rank 0's disk.
    saving = bool(args.checkpoint) and rank == 0
    # A snapshot after every step (kept in the node launcher's memory, see
    # ddp_launch.checkpoint.snapshot): a crash then loses at most a step, not the steps since
    # the last save, unless a snapshot costs more than --snapshot-budget of a step: then
    # every 2nd, 4th, ... step. Every rank calls it; one copy per node is kept.
    snapshotting = bool(args.checkpoint) and args.snapshot and checkpoint is not None
    last_saved_step = global_step
    for epoch in range(start_epoch, args.epochs):
        if 0 < args.max_steps <= global_step:
            break
        sampler.set_epoch(epoch)  # a new order each epoch, the same on every run: seed + epoch
        skip = start_batch if epoch == start_epoch else 0
        loss_sum, n_batches = 0.0, 0
        for batch, (x, y) in enumerate(loader):
            if batch < skip:
                continue  # done before the restart
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp_model(x), y)
            loss.backward()
            optimizer.step()
            global_step += 1
            position = (epoch, batch + 1)

            loss_value = loss.item()  # a sync point each step; negligible for a model this small
            loss_sum, n_batches = loss_sum + loss_value, n_batches + 1
            report(
                step=global_step,
                loss=loss_value,
                samples=global_step * args.batch_size * world_size,
                total_steps=total_steps,
            )
            if snapshotting:  # a function: steps the budget passes over build no state
                checkpoint.snapshot(state_now, step=global_step, budget=args.snapshot_budget or None)
            if saving and args.checkpoint_every > 0 and global_step % args.checkpoint_every == 0:
                save()
                last_saved_step = global_step
            if 0 < args.max_steps <= global_step:
                break
        if rank == 0 and n_batches:
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / n_batches:.4f}", flush=True)

    if saving and global_step != last_saved_step:
        save()

    counts = checkpoint.snapshot_counts() if snapshotting else None
    if counts is not None:
        print(f"snapshots: {counts['taken']} taken, {counts['passed_over']} passed over by the budget, "
              f"every {counts['every']} step(s) at the end", flush=True)  # fmt: skip
    if rank == 0:
        loss, accuracy = evaluate(model, data, device)
        print(f"final loss {loss:.4f} accuracy {accuracy:.4f}", flush=True)
    if args.print_digest:
        print(f"param-digest rank={rank} sha256={param_digest(model)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""ddp-launch: a launcher for PyTorch DistributedDataParallel training.

Inside a worker, the public API is::

    import ddp_launch
    ddp_launch.report(loss=loss.item(), samples=batch_size, total_steps=1000)

    from ddp_launch import checkpoint
    state = checkpoint.load("ckpt.pt")          # None when there is none yet
    checkpoint.save({"model": model.state_dict()}, "ckpt.pt")   # atomic

Both work (and cost nothing) outside ddp-launch too, so a script stays runnable under torchrun.
"""

from ddp_launch.progress import report

__version__ = "0.1.0"
__all__ = ["__version__", "report"]

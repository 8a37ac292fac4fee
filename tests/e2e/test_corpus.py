"""Real projects' torchrun command lines, run under torchrun and, with the word swapped, under
ddp-launch: the same world size, argv, exit code and output files.

Each line is spelled as the project's README or launch script spells it; a tiny CPU script
(scripts/corpus_train.py, gloo) stands in for the project's training script. Fixed ports
become free ones, 8 GPUs become 2 CPU workers; nothing else changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.launch import (
    SCRIPTS,
    free_port,
    launcher_command,
    launcher_env,
    run_command,
    torchrun_command,
    torchrun_env,
)

pytestmark = [pytest.mark.e2e]


def _lines(port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    return {
        # nanoGPT README: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
        "nanogpt": (["--standalone", "--nproc_per_node=2", "train.py", "config/train_gpt2.py"], {}),
        # nanochat speedrun.sh: torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
        "nanochat": (["--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", "--", "--depth=20"], {}),
        # torchtitan run_train.sh
        "torchtitan": (
            [
                "--nproc_per_node=2",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint=localhost:0",
                "--local-ranks-filter",
                "0",
                "--role",
                "rank",
                "--tee",
                "3",
                "-m",
                "torchtitan.train",
                "--job.config_file",
                "./train_configs/debug_model.toml",
            ],
            {},
        ),  # fmt: skip
        # pytorch/examples distributed/ddp-tutorial-series
        "pytorch-examples": (
            [
                "--nnodes=1",
                "--nproc_per_node=2",
                "--rdzv_id=100",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=localhost:{port}",
                "multigpu_torchrun.py",
                "50",
                "10",
            ],
            {},
        ),  # fmt: skip
        # Hugging Face transformers examples
        "transformers": (
            ["--nproc_per_node", "2", "run_glue.py", "--model_name_or_path", "bert-base-cased", "--do_train"],
            {},
        ),
        # Lightning's docs: a static multi-node line on one node
        "lightning": (
            [
                "--nproc_per_node=2",
                "--nnodes=1",
                "--node_rank=0",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "train.py",
                "--trainer.max_epochs=1",
            ],
            {},
        ),  # fmt: skip
        # torchft README: torchrun --master_port=29600 --nnodes=1 --nproc_per_node=1 -- train_ddp.py
        "torchft": ([f"--master_port={port}", "--nnodes=1", "--nproc_per_node=2", "--", "train_ddp.py"], {}),
        # Kubeflow's PyTorchJob: the options come as PET_ variables
        "kubeflow": (["train.py"], {"PET_NPROC_PER_NODE": "2", "PET_NNODES": "1", "PET_NODE_RANK": "0"}),
    }


def _lay_out(tmp_path: Path) -> None:
    """Every script and module the lines name, each the same tiny training script."""
    body = (SCRIPTS / "corpus_train.py").read_text()
    for relative in ("train.py", "multigpu_torchrun.py", "run_glue.py", "train_ddp.py"):
        (tmp_path / relative).write_text(body)
    for package, module in (("scripts", "base_train"), ("torchtitan", "train")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / f"{module}.py").write_text(body)


def _run(tmp_path: Path, name: str, command: list[str], extra_env: dict[str, str]):
    out = tmp_path / name
    out.mkdir()
    env = {**torchrun_env(launcher_env()), **extra_env, "CORPUS_OUT": str(out)}
    run = run_command(command, tmp_path, env, timeout_s=150)
    files = {p.name: json.loads(p.read_text()) for p in sorted(out.iterdir())}
    return run, files


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "project",
    ["nanogpt", "nanochat", "torchtitan", "pytorch-examples", "transformers", "lightning", "torchft", "kubeflow"],
)
def test_a_projects_torchrun_line_runs_the_same_under_ddp_launch(tmp_path: Path, project: str) -> None:
    _lay_out(tmp_path)
    port = free_port()
    args, extra_env = _lines(port)[project]

    theirs, their_files = _run(tmp_path, "torchrun", torchrun_command(*args), extra_env)
    # torch 2.13's torchrun sometimes exits 1 in teardown after every rank finished: the
    # outcome to compare is then every rank's result file, which it wrote before.
    assert theirs.returncode in (0, 1), theirs.output
    assert len(their_files) == 2, theirs.output
    ours, our_files = _run(
        tmp_path, "ddp", launcher_command("--run-dir", str(tmp_path / "run"), "-q", *args), extra_env
    )

    assert ours.returncode == 0, ours.output
    assert our_files == their_files
    record = our_files["rank0.json"]
    assert record["world_size"] == 2 and record["all_reduce"] == 3.0
    assert record["loaded"] == [0, 1, 4, 9, 16, 25, 36, 49]  # the lambda dataset, through 2 loader workers
    assert record["pooled"] == [100, 101, 102]  # Pool children read __main__'s global
    if theirs.returncode == 0:
        assert ours.returncode == theirs.returncode
    if project == "torchtitan":  # --local-ranks-filter 0: rank 1's output is not on the console
        assert "rank 1 of 2 done" not in ours.stdout + ours.stderr
        assert "rank 0 of 2 done" in ours.stdout + ours.stderr
    shutil.rmtree(tmp_path / "run", ignore_errors=True)

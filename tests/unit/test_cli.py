"""The CLI's parsing and its error path, RunConfig validation and the environment contract.

The launcher is replaced by a fake that records the RunConfig it is given: nothing starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import ddp_launch.launcher
import ddp_launch.run.warm
from ddp_launch import env
from ddp_launch import options as options_module
from ddp_launch.cli import cli, main
from ddp_launch.config import NODE_BY_ARRIVAL, RestartPolicy, RunConfig, Target
from ddp_launch.errors import ConfigError
from ddp_launch.options import parse_nproc

# -- parse_nproc ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "n"), [("4", 4), ("1", 1), (" 2 ", 2), ("16", 16)])
def test_parse_nproc_counts(text: str, n: int) -> None:
    assert parse_nproc(text) == n


def test_parse_nproc_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert parse_nproc("cpu") == 12
    assert parse_nproc("CPU") == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(), raising=False)  # "cannot be determined"
    assert parse_nproc("cpu") == 1


def test_parse_nproc_gpu_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(options_module, "_gpu_count", lambda: 2)
    assert parse_nproc("gpu") == 2
    assert parse_nproc("auto") == 2
    monkeypatch.setattr(options_module, "_gpu_count", lambda: 0)
    assert parse_nproc("auto") == 8
    with pytest.raises(ConfigError, match="no CUDA device"):
        parse_nproc("gpu")


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "2.5", "4x", "cpus"])
def test_parse_nproc_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="-n/--nproc-per-node"):
        parse_nproc(text)


# -- the click command, parsing only -------------------------------------------------------


@dataclass
class FakeOutcome:
    exit_code: int = 0
    summary: str = "ddp-launch: run succeeded"
    report: str = ""


class FakeLaunch:
    def __init__(self, outcome: FakeOutcome) -> None:
        self.outcome = outcome
        self.configs: list[RunConfig] = []

    def __call__(self, config: RunConfig, **kw: object) -> FakeOutcome:
        self.configs.append(config)
        return self.outcome

    @property
    def config(self) -> RunConfig:
        assert len(self.configs) == 1
        return self.configs[0]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeLaunch:
    """The launcher and the forkserver replaced; the working directory holds train.py."""
    fake = FakeLaunch(FakeOutcome())
    monkeypatch.setattr(ddp_launch.launcher, "launch", fake)
    monkeypatch.setattr(ddp_launch.run.warm, "forkserver_context", lambda: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    return fake


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, prog_name="ddp-launch", catch_exceptions=False)


def test_script_args_pass_through_untouched(launched: FakeLaunch) -> None:
    result = invoke(["-n", "2", "train.py", "--lr", "0.1", "-n", "5"])

    assert result.exit_code == 0, result.output
    config = launched.config
    assert config.nproc_per_node == 2
    assert config.target == Target("train.py", ("--lr", "0.1", "-n", "5"), is_module=False)
    assert config.target.argv == ["train.py", "--lr", "0.1", "-n", "5"]


@pytest.mark.parametrize(
    "tail",
    [
        ["--help"],
        ["-m", "x", "--max-restarts", "3"],
        ["--x", "--"],
        ["-q", "positional", "--timeout=5"],
        ["run", "status"],
        [],
    ],
)
def test_launcher_options_after_the_script_belong_to_the_script(launched: FakeLaunch, tail: list[str]) -> None:
    result = invoke(["train.py", *tail])

    assert result.exit_code == 0, result.output
    assert launched.config.target.args == tuple(tail)
    assert launched.config.nproc_per_node == 1
    assert launched.config.restart.max_restarts == 0
    assert not launched.config.target.is_module


def test_explicit_run_subcommand(launched: FakeLaunch) -> None:
    result = invoke(["run", "-n", "3", "train.py", "a"])

    assert result.exit_code == 0, result.output
    assert launched.config.nproc_per_node == 3
    assert launched.config.target.args == ("a",)


def test_module_flag(launched: FakeLaunch) -> None:
    result = invoke(["-n", "2", "-m", "json.tool", "--indent", "2"])

    assert result.exit_code == 0, result.output
    assert launched.config.target == Target("json.tool", ("--indent", "2"), is_module=True)


def test_defaults(launched: FakeLaunch) -> None:
    result = invoke(["train.py"])

    assert result.exit_code == 0, result.output
    config = launched.config
    assert config.restart == RestartPolicy(max_restarts=0, stop_grace_s=5.0, hang_timeout_s=300.0)
    assert config.nproc_per_node == 1
    assert config.nnodes == 1 and config.node_rank == 0
    assert config.backend == "auto"
    assert config.master_addr == "127.0.0.1"
    assert config.control_port is None and config.ddp_port is None
    assert (config.role, config.monitor_interval_s, config.start_method) == ("default", 0.25, "warm")
    assert config.timeout_s is None
    assert config.join_timeout_s == 300.0
    assert config.heartbeat_interval_s == 1.0
    assert config.quiet is False
    assert config.run_dir == Path("runs") / config.run_id


def test_options_reach_the_config(launched: FakeLaunch, tmp_path: Path) -> None:
    result = invoke(
        [
            "-n",
            "2",
            "--max-restarts",
            "3",
            "--hang-timeout",
            "60",
            "--stop-grace",
            "1.5",
            "--timeout",
            "30",
            "--master-port",
            "29500",
            "--backend",
            "gloo",
            "--run-id",
            "my-run",
            "--run-dir",
            str(tmp_path / "out"),
            "--heartbeat-interval",
            "0.5",
            "--join-timeout",
            "20",
            "-q",
            "--standalone",
            "train.py",
        ]
    )

    assert result.exit_code == 0, result.output
    c = launched.config
    assert c.restart == RestartPolicy(max_restarts=3, stop_grace_s=1.5, hang_timeout_s=60.0)
    assert (c.timeout_s, c.ddp_port, c.control_port, c.backend, c.run_id) == (30.0, 29500, 29501, "gloo", "my-run")
    assert c.run_dir == tmp_path / "out"
    assert (c.heartbeat_interval_s, c.join_timeout_s, c.quiet) == (0.5, 20.0, True)


def test_the_outcome_becomes_the_exit_code(launched: FakeLaunch) -> None:
    launched.outcome = FakeOutcome(exit_code=137, summary="the summary", report="the report")

    result = invoke(["train.py"])

    assert result.exit_code == 137
    assert "the summary" in result.output and "the report" in result.output


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"]])
def test_help_shows_an_example(args: list[str]) -> None:
    result = invoke(args)

    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "ddp-launch -n 4 examples/train_mlp.py --epochs 3" in result.output


def test_run_help_lists_the_defaults() -> None:
    output = invoke(["run", "--help"]).output

    assert "--max-restarts" in output and "--hang-timeout" in output and "--stop-grace" in output
    assert "[default: 300.0]" in output


# -- main: bad input is one line and exit 2 ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-n", "0", "train.py"], "-n/--nproc-per-node must be >= 1"),
        (["-n", "lots", "train.py"], "-n/--nproc-per-node"),
        (["missing.py"], "does not exist"),
        (["--max-restarts", "-1", "train.py"], "--max-restarts"),
        (["--backend", "mpi", "train.py"], "--backend"),
        (["--max-restarts", "many", "train.py"], "--max-restarts"),
        (["--bogus-option", "train.py"], "--bogus-option"),
        (["--master-port", "70000", "train.py"], "--master-port"),
        (["--timeout", "0", "train.py"], "--timeout"),
        (["-m", "no_such_module_xyz"], "no_such_module_xyz"),
        ([], "SCRIPT"),
    ],
)
def test_main_bad_input_is_one_line_and_exit_2(
    launched: FakeLaunch, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)

    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddp-launch: error: ")
    assert fragment in lines[0]
    assert launched.configs == []  # nothing was launched


def test_main_passes_the_run_exit_code(launched: FakeLaunch, capsys: pytest.CaptureFixture[str]) -> None:
    launched.outcome = FakeOutcome(exit_code=3)

    with pytest.raises(SystemExit) as exc:
        main(["-n", "2", "train.py", "--epochs", "1"])

    assert exc.value.code == 3
    assert launched.config.target.args == ("--epochs", "1")


def test_main_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "Example:" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert ddp_launch.__version__ in capsys.readouterr().out


# -- RunConfig.validate ----------------------------------------------------------------------


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text("pass\n")
    return path


def valid_config(script: Path, **kw: object) -> RunConfig:
    return RunConfig(target=Target(str(script)), nproc_per_node=2, run_dir=script.parent / "run", **kw)  # type: ignore[arg-type]


def test_a_valid_config_validates(script: Path) -> None:
    valid_config(script).validate()
    valid_config(
        script, nnodes=2, node_rank=1, control_port=29401, token="t", ddp_port=29400, backend="nccl", timeout_s=1.0
    ).validate()


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"nnodes": 2, "token": "t"}, "--master-port is required"),
        ({"nnodes": 2, "node_rank": 1, "control_port": 29400, "token": "t", "metrics_port": 9000}, "node 0"),
    ],
)
def test_several_nodes_need_a_port(script: Path, kw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        valid_config(script, **kw).validate()


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"nproc_per_node": 0}, "-n/--nproc-per-node must be >= 1"),
        ({"nnodes": 0}, "--nnodes"),
        ({"node_rank": 1}, "--node-rank must be in [0, 1)"),
        ({"node_rank": -1}, "--node-rank"),
        ({"ddp_port": 0}, "--master-port must be in 1..65535"),
        ({"ddp_port": 65536}, "--master-port"),
        ({"control_port": -5}, "--control-port"),
        ({"monitor_interval_s": 0.0}, "--monitor-interval"),
        ({"backend": "mpi"}, "--backend must be one of auto, gloo, nccl"),
        ({"heartbeat_interval_s": 0.0}, "--heartbeat-interval"),
        ({"timeout_s": 0.0}, "--timeout must be > 0"),
        ({"timeout_s": -1.0}, "--timeout"),
        ({"join_timeout_s": 0.0}, "--join-timeout"),
        ({"restart": RestartPolicy(max_restarts=-1)}, "--max-restarts must be >= 0, got -1"),
        ({"restart": RestartPolicy(stop_grace_s=-0.1)}, "--stop-grace"),
        ({"restart": RestartPolicy(hang_timeout_s=-1.0)}, "--hang-timeout"),
        ({"restart": RestartPolicy(hang_timeout_s=2.0)}, "--hang-timeout 2 is shorter than 3 heartbeat intervals"),
        (
            {"restart": RestartPolicy(hang_timeout_s=1.0), "heartbeat_interval_s": 0.5},
            "(--heartbeat-interval 0.5)",
        ),
    ],
)
def test_bad_values_are_config_errors(script: Path, kw: dict, fragment: str) -> None:
    config = replace(valid_config(script), **kw)

    with pytest.raises(ConfigError) as exc:
        config.validate()
    assert fragment in str(exc.value)


def test_bad_targets_are_config_errors(tmp_path: Path, script: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        valid_config(tmp_path / "nope.py").validate()
    with pytest.raises(ConfigError, match="is a directory"):
        RunConfig(target=Target(str(tmp_path)), nproc_per_node=1, run_dir=tmp_path / "run").validate()
    with pytest.raises(ConfigError, match="cannot be found"):
        RunConfig(target=Target("no_such_module_xyz", is_module=True), nproc_per_node=1).validate()
    with pytest.raises(ConfigError, match="no module"):
        RunConfig(target=Target("", is_module=True), nproc_per_node=1).validate()
    RunConfig(target=Target("json.tool", is_module=True), nproc_per_node=1, run_dir=tmp_path / "run").validate()


def test_a_run_dir_that_is_a_file_is_a_config_error(script: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")

    with pytest.raises(ConfigError, match="not a directory"):
        replace(valid_config(script), run_dir=taken).validate()


# -- the environment contract ----------------------------------------------------------------


def assignment(**kw: object) -> env.Assignment:
    fields: dict[str, object] = {
        "rank": 5,
        "local_rank": 1,
        "world_size": 8,
        "local_world_size": 4,
        "node_rank": 1,
        "nnodes": 2,
        "ddp_addr": "10.0.0.7",
        "ddp_port": 29511,
        "run_id": "20261125-142215-3f9a",
        "generation": 2,
        "max_restarts": 3,
    }
    fields.update(kw)
    return env.Assignment(**fields)  # type: ignore[arg-type]


def test_torchrun_env_values() -> None:
    assert env.torchrun_env(assignment(), {}) == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "5",
        "ROLE_WORLD_SIZE": "8",
        "ROLE_NAME": "default",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29511",
        "TORCHELASTIC_RUN_ID": "20261125-142215-3f9a",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def test_node_env_follows_torchruns_omp_rule() -> None:
    """OMP_NUM_THREADS=1 only with more than one worker and none set, as torchrun."""
    assert env.node_env(2, {}, "default", "SIGTERM")["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in env.node_env(1, {}, "default", "SIGTERM")
    assert "OMP_NUM_THREADS" not in env.node_env(4, {"OMP_NUM_THREADS": "6"}, "default", "SIGTERM")
    assert "OMP_NUM_THREADS" not in env.torchrun_env(assignment(), {})


def test_node_env_role_and_signals_reach_the_torchrun_env() -> None:
    node = env.node_env(2, {}, "trainer", "SIGTERM,SIGUSR1")
    assert node["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGUSR1"
    worker = env.torchrun_env(assignment(), node)
    assert worker["ROLE_NAME"] == "trainer"


def test_virtual_local_rank() -> None:
    got = env.torchrun_env(assignment(local_rank=1), {}, virtual_local_rank=True)
    assert (got["LOCAL_RANK"], got["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    got = env.torchrun_env(assignment(local_rank=1), {"CUDA_VISIBLE_DEVICES": "4,6"}, virtual_local_rank=True)
    assert (got["LOCAL_RANK"], got["CUDA_VISIBLE_DEVICES"]) == ("0", "6")


def test_torchrun_env_keeps_nccl_async_error_handling() -> None:
    kept = env.torchrun_env(assignment(), {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    assert kept["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_torchrun_env_error_file_below_the_run_dir() -> None:
    a = assignment()
    assert "TORCHELASTIC_ERROR_FILE" not in env.torchrun_env(a, {})

    with_dir = env.torchrun_env(a, {}, run_dir="/runs/r1")

    assert with_dir["TORCHELASTIC_ERROR_FILE"] == "/runs/r1/errors/generation-2/rank-5.json"


def test_torchrun_env_values_are_strings() -> None:
    assert all(isinstance(v, str) for v in env.torchrun_env(assignment(), {}).values())


def bootstrap(**kw: object) -> env.Bootstrap:
    fields: dict[str, object] = {
        "control_addr": "127.0.0.1:41234",
        "token": "s3cret-token",
        "node_rank": 1,
        "local_rank": 3,
        "generation": 2,
        "backend": "gloo",
        "heartbeat_interval_s": 0.1,
        "master_lost_timeout_s": 30.0,
        "join_timeout_s": 12.5,
    }
    fields.update(kw)
    return env.Bootstrap(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "b", [bootstrap(), bootstrap(heartbeat_interval_s=1 / 3, join_timeout_s=1e-3, token="", backend="auto")]
)
def test_bootstrap_round_trip(b: env.Bootstrap) -> None:
    environ = b.to_env()

    assert all(isinstance(v, str) for v in environ.values())
    assert env.Bootstrap.from_env(environ) == b
    assert env.in_worker(environ)


def test_bootstrap_defaults_and_in_worker() -> None:
    b = env.Bootstrap.from_env({env.CONTROL_ADDR: "h:1", env.LOCAL_RANK: "0"})

    assert (b.node_rank, b.generation, b.backend, b.token) == (0, 0, "auto", "")
    assert math.isclose(b.heartbeat_interval_s, 1.0)
    assert not env.in_worker({"RANK": "0"})


# -- torchrun's spellings and PET_ variables -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "field", "value"),
    [
        (["--nproc_per_node=3"], "nproc_per_node", 3),
        (["--nproc-per-node", "3"], "nproc_per_node", 3),
        (["--max_restarts", "2"], "restart", RestartPolicy(max_restarts=2)),
        (["--monitor_interval", "0.5"], "monitor_interval_s", 0.5),
        (["--role", "trainer"], "role", "trainer"),
        (["--rdzv_id", "job-7"], "run_id", "job-7"),
        (["--start_method", "spawn"], "start_method", "spawn"),
        (["--start-method", "fork"], "start_method", "warm"),
        (["--shutdown_timeout", "9"], "restart", RestartPolicy(stop_grace_s=9.0)),
        (["--signals_to_handle", "SIGTERM,SIGUSR1"], "signals", (15, 10)),
        (["--virtual_local_rank"], "virtual_local_rank", True),
        (["--nnodes", "1:1"], "nnodes", 1),
        (["--standalone"], "master_addr", "127.0.0.1"),
        (["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:29400"], "ddp_port", 29400),
        (["--rdzv-endpoint", "[::1]:29400"], "master_addr", "::1"),
        (["--master_addr", "127.0.0.1", "--master_port", "1"], "control_port", 2),
        (["--local_ranks_filter", "0,1"], "logs", None),
    ],
)
def test_torchrun_spellings_reach_the_config(launched: FakeLaunch, args: list[str], field: str, value: object) -> None:
    result = invoke([*args, "train.py"])

    assert result.exit_code == 0, result.output
    got = getattr(launched.config, field)
    if field == "logs":
        assert got.local_ranks_filter == frozenset({0, 1})
    else:
        assert got == value


@pytest.mark.parametrize(
    ("environ", "field", "value"),
    [
        ({"PET_NPROC_PER_NODE": "2"}, "nproc_per_node", 2),
        ({"PET_MAX_RESTARTS": "4"}, "restart", RestartPolicy(max_restarts=4)),
        ({"PET_MASTER_PORT": "29600"}, "ddp_port", 29600),
        ({"PET_STANDALONE": "1"}, "nnodes", 1),
        ({"PET_ROLE": "worker"}, "role", "worker"),
        ({"PET_MODULE": "1"}, "target", Target("json.tool", is_module=True)),
    ],
)
def test_pet_variables_are_option_fallbacks(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], field: str, value: object
) -> None:
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    script = "json.tool" if "PET_MODULE" in environ else "train.py"

    result = invoke([script])

    assert result.exit_code == 0, result.output
    assert getattr(launched.config, field) == value


def test_an_explicit_flag_wins_over_its_pet_variable(launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")

    assert invoke(["--nproc_per_node", "3", "train.py"]).exit_code == 0
    assert launched.config.nproc_per_node == 3


def test_several_nodes_without_a_token_share_one_derived_from_the_endpoint(launched: FakeLaunch) -> None:
    port = free_port() - 1
    line = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
    assert invoke([*line, "--node_rank=0", "train.py"]).exit_code == 0
    assert invoke([*line, "--node_rank=1", "train.py"]).exit_code == 0
    node0, node1 = launched.configs
    assert node0.token and node0.token == node1.token
    assert (node0.control_port, node1.node_rank) == (port + 1, 1)


def free_port() -> int:
    from tests.e2e.launch import free_port as free_pair  # P and P + 1 both free

    return free_pair() + 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--rdzv_backend", "etcd"], "--rdzv-backend 'etcd' is not supported: use c10d or static"),
        (["--nnodes", "1:2"], "needs --rdzv-backend c10d and --rdzv-endpoint"),
        (["--nnodes", "2:1"], "--nnodes"),
        (["--nnodes", "2:3", "--rdzv_backend", "static"], "needs --rdzv-backend c10d"),
        (["--rdzv_conf", "last_call_timeout=soon"], "last_call_timeout='soon' is not a number"),
        (["--no-python", "-m"], "--no-python and -m/--module"),
        (["--numa-binding", "node"], "numactl"),
        (["--logs-specs", "mine"], "--log-dir"),
        (["--event_log_handler", "console"], "events.jsonl"),
        (["--rdzv_conf", "read_timeout=5"], "--rdzv-conf read_timeout"),
        (["--signals_to_handle", "SIGFOO"], "SIGFOO"),
        (["--redirects", "7"], "-r/--redirects"),
        (["--local_ranks_filter", "a,b"], "--local-ranks-filter"),
        (["--start_method", "thread"], "--start-method"),
        (["--standalone", "--nnodes", "2"], "--standalone runs one node"),
        (["--nproc_per_node", "xpu"], "xpu"),
    ],
)
def test_torchrun_options_that_cannot_mean_the_same_are_one_line_exit_2(
    launched: FakeLaunch, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "train.py"])

    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert fragment in err
    assert launched.configs == []


def test_nccl_without_cuda_is_refused_before_anything_starts(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(options_module, "_gpu_count", lambda: 0)
    with pytest.raises(SystemExit) as exc:
        main(["--backend", "nccl", "train.py"])

    assert exc.value.code == 2
    assert "--backend gloo" in capsys.readouterr().err
    assert launched.configs == []


def test_a_bad_pet_variable_is_named(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PET_NNODES", "1:3")
    with pytest.raises(SystemExit) as exc:
        main(["train.py"])

    assert exc.value.code == 2
    assert "(from PET_NNODES)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "script_args"),
    [
        (["--", "train.py", "--lr", "1"], ("--lr", "1")),
        (["train.py", "--", "--lr", "1"], ("--lr", "1")),
        (["--", "train.py", "--", "x"], ("--", "x")),
        (["train.py", "a", "--", "x"], ("a", "--", "x")),
        (["train.py", "--", "--", "a"], ("--", "a")),
    ],
)
def test_double_dash_gives_the_script_torchruns_argv(
    launched: FakeLaunch, args: list[str], script_args: tuple[str, ...]
) -> None:
    """The argv torchrun's argparse gives (checked against torch's own parser in the e2e corpus)."""
    assert invoke(["--nproc_per_node", "2", *args]).exit_code == 0
    assert launched.config.target.args == script_args


def test_did_you_mean_is_gone_for_torchruns_own_options(launched: FakeLaunch) -> None:
    """`--rdzv_backend` once failed with "Did you mean '--backend'?"."""
    result = invoke(["--rdzv_backend", "c10d", "--rdzv_id", "x", "train.py"])

    assert result.exit_code == 0 and "Did you mean" not in result.output
    assert launched.config.run_id == "x"


def test_c10d_the_endpoints_host_is_node_0_unless_taken_and_others_get_ranks_at_rendezvous(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port() - 1
    line = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py"]
    assert invoke(line).exit_code == 0
    assert launched.configs[-1].node_rank == 0
    assert invoke(["--rdzv_conf", "is_host=0", *line]).exit_code == 0
    assert launched.configs[-1].node_rank == NODE_BY_ARRIVAL
    monkeypatch.setattr(options_module, "is_local_host", lambda host: False)
    assert invoke(line).exit_code == 0
    assert launched.configs[-1].node_rank == NODE_BY_ARRIVAL
    assert invoke(["--nnodes=3", *line[1:]]).exit_code == 0  # node 1 or 2: the master says
    assert (launched.configs[-1].nnodes, launched.configs[-1].node_rank) == (3, NODE_BY_ARRIVAL)


def test_an_elastic_range_is_min_and_max_nodes_with_ranks_at_rendezvous(launched: FakeLaunch) -> None:
    port = free_port() - 1
    line = ["--nnodes=2:3", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py"]
    assert invoke(["--rdzv_conf", "last_call_timeout=1.5", *line]).exit_code == 0
    host = launched.configs[-1]
    assert (host.fewest_nodes, host.nnodes, host.elastic, host.node_rank, host.last_call_s) == (2, 3, True, 0, 1.5)
    assert invoke(["--node_rank", "2", *line]).exit_code == 0  # a rank here only says "not the host"
    assert launched.configs[-1].node_rank == NODE_BY_ARRIVAL


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("localhost:29400", ("localhost", 29400)),
        ("node0", ("node0", 29400)),
        ("[::1]:29401", ("::1", 29401)),
        ("[::1]", ("::1", 29400)),
        ("fe80::1:29402", ("fe80::1", 29402)),  # torchrun reads the last colon's tail as the port
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_rendezvous_endpoints_parse_as_torchruns(endpoint: str, expected: tuple[str, int]) -> None:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    assert options_module.split_endpoint(endpoint, 29400) == expected == parse_rendezvous_endpoint(endpoint, 29400)


@pytest.mark.parametrize("endpoint", ["host:", "[::1]:", "host:99999", "host:http", ":29400"])
def test_bad_rendezvous_endpoints_are_config_errors(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        options_module.split_endpoint(endpoint, 29400)


SLURM_TWO_NODES = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-2]"}


def test_under_slurm_c10d_takes_slurms_node_rank(launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SLURM_TWO_NODES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(options_module, "is_local_host", lambda host: True)  # it would guess node 0
    port = free_port() - 1

    assert invoke(["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py"]).exit_code == 0
    assert (launched.config.nnodes, launched.config.node_rank) == (2, 1)


def test_under_slurm_the_run_id_and_port_come_from_the_job(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ddp_launch.cluster import job_port

    for k, v in SLURM_TWO_NODES.items():
        monkeypatch.setenv(k, v)
    assert invoke(["--nproc_per_node=1", "train.py"]).exit_code == 0
    # Every node of job 7 agrees on both without being told; another job gets another port.
    assert (launched.config.run_id, launched.config.ddp_port) == ("slurm-7", job_port("7"))
    assert launched.config.control_port == job_port("7") + 1 and job_port("8") != job_port("7")


def test_under_slurm_explicit_run_id_and_port_win(launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SLURM_TWO_NODES.items():
        monkeypatch.setenv(k, v)
    assert invoke(["--master-port", "31000", "--run-id", "mine", "train.py"]).exit_code == 0
    assert (launched.config.run_id, launched.config.ddp_port) == ("mine", 31000)


def test_standalone_inside_a_slurm_allocation_is_one_node(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in SLURM_TWO_NODES.items():
        monkeypatch.setenv(k, v)

    assert invoke(["--standalone", "--nproc_per_node=2", "train.py"]).exit_code == 0
    assert (launched.config.nnodes, launched.config.node_rank, launched.config.master_addr) == (1, 0, "127.0.0.1")


def test_run_path_takes_precedence_over_no_python(launched: FakeLaunch) -> None:
    assert invoke(["--run-path", "--no-python", "train.py"]).exit_code == 0
    assert launched.config.target == Target("train.py")


def test_cpu_counts_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parse_nproc("cpu") == 2


def test_virtual_local_rank_needs_a_visible_device_per_worker(
    launched: FakeLaunch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match="names 2 device"):
        invoke(["--virtual-local-rank", "-n", "4", "train.py"])
    assert invoke(["--virtual-local-rank", "-n", "2", "train.py"]).exit_code == 0

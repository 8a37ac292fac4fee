"""SLURM host lists and the SLURM environment, simulated with dicts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddp_launch.cluster import MAX_HOSTS, ClusterDefaults, detect, expand_hostlist, job_port
from ddp_launch.errors import ConfigError

# ---------------------------------------------------------------------------- expand_hostlist


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a,b", ["a", "b"]),
        ("node[1-2],login1", ["node1", "node2", "login1"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("host", ["host"]),
        ("  host  ", ["host"]),
        (" a , b ", ["a", "b"]),
        ("gpu[ 1 - 2 , 4 ]", ["gpu1", "gpu2", "gpu4"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),  # no padding: the start has width 1
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),  # padded to the start's width
        ("gpu[098-100]", ["gpu098", "gpu099", "gpu100"]),
        ("gpu[7]", ["gpu7"]),
        ("gpu[007]", ["gpu007"]),
        ("gpu[3-3]", ["gpu3"]),
        ("n[1-2].cluster.local", ["n1.cluster.local", "n2.cluster.local"]),
        ("[1-2]", ["1", "2"]),
        ("a[1,2],b[3-4],c", ["a1", "a2", "b3", "b4", "c"]),
        ("x[2,1]", ["x2", "x1"]),  # order as written
        ("h1,h1", ["h1", "h1"]),  # no silent de-duplication
        ("gpu-node-12", ["gpu-node-12"]),
    ],
)
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize(
    "spec",
    [
        "gpu[",
        "gpu]",
        "gpu[3-1]",
        "gpu[a-b]",
        "",
        "   ",
        "gpu[]",
        "gpu[ ]",
        "gpu[1-]",
        "gpu[-1]",
        "gpu[1-2-3]",
        "gpu[1,,2]",
        "gpu[1[2]]",
        "a,,b",
        "a,",
        ",a",
        "gpu 1",
        "gpu[+1]",
        "gpu[1_000]",
        "gpu[0-999999999]",
        "a[0-999]b[0-999]",
    ],
)
def test_expand_hostlist_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand_hostlist(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "\n" not in message


def test_expand_hostlist_bounds_its_size() -> None:
    assert len(expand_hostlist(f"n[1-{MAX_HOSTS}]")) == MAX_HOSTS
    with pytest.raises(ConfigError, match="more than"):
        expand_hostlist(f"n[1-{MAX_HOSTS}],extra")


def _compress(numbers: list[int], width: int) -> str:
    """The bracket body SLURM would write for sorted numbers: consecutive runs as ranges."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return ",".join(f"{a:0{width}d}" if a == b else f"{a:0{width}d}-{b:0{width}d}" for a, b in runs)


prefixes = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._", min_size=1, max_size=12
)
suffixes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-.", max_size=6)


@given(
    prefix=prefixes,
    suffix=suffixes,
    numbers=st.sets(st.integers(min_value=0, max_value=5000), min_size=1, max_size=60),
    width=st.integers(min_value=1, max_value=5),
)
def test_compressed_spec_expands_to_the_sorted_hosts(prefix: str, suffix: str, numbers: set[int], width: int) -> None:
    ordered = sorted(numbers)
    spec = f"{prefix}[{_compress(ordered, width)}]{suffix}"
    assert expand_hostlist(spec) == [f"{prefix}{n:0{width}d}{suffix}" for n in ordered]


@given(
    groups=st.lists(
        st.tuples(prefixes, st.sets(st.integers(min_value=0, max_value=300), min_size=1, max_size=10)),
        min_size=1,
        max_size=5,
    ),
    width=st.integers(min_value=1, max_value=3),
)
def test_several_compressed_groups_keep_their_order(groups: list[tuple[str, set[int]]], width: int) -> None:
    spec = ",".join(f"{p}[{_compress(sorted(ns), width)}]" for p, ns in groups)
    assert expand_hostlist(spec) == [f"{p}{n:0{width}d}" for p, ns in groups for n in sorted(ns)]


@given(st.text(max_size=30))
def test_any_text_expands_or_raises_config_error(spec: str) -> None:
    try:
        hosts = expand_hostlist(spec)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert hosts and all(hosts)


# ---------------------------------------------------------------------------- detect

SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-09,12]",
    "SLURM_PROCID": "2",
    "SLURM_SUBMIT_DIR": "/home/me/project",
}


def test_nothing_set() -> None:
    assert detect({}) == ClusterDefaults(None, None, None, None, None, "")
    assert detect({"HOME": "/root", "PATH": "/bin"}).source == ""


def test_slurm() -> None:
    assert detect(SLURM) == ClusterDefaults(
        nnodes=4,
        node_rank=2,
        master_addr="gpu07",
        master_port=job_port("123456"),
        nproc_per_node=None,
        source="slurm",
        run_id="slurm-123456",
    )


def test_a_slurm_jobs_port_and_run_id_are_its_own() -> None:
    # Every node of a job derives the same; two jobs (or two steps of one) sharing nodes differ.
    ports = {job_port(str(job)) for job in range(500_000, 510_000)}
    assert len(ports) == 10_000 and all(20000 <= p < 40000 and p % 2 == 0 for p in ports)
    assert job_port("77", "0") != job_port("77", "1") != job_port("78", "0")
    step = detect(dict(SLURM, SLURM_STEP_ID="3"))
    assert (step.run_id, step.master_port) == ("slurm-123456.3", job_port("123456", "3"))


def test_slurm_alternative_names() -> None:
    env = {"SLURM_JOBID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "a,b"}
    assert detect(env) == ClusterDefaults(2, 0, "a", job_port("9"), None, "slurm", "slurm-9")


def test_slurm_prefers_the_primary_names() -> None:
    env = dict(SLURM, SLURM_JOB_NUM_NODES="8", SLURM_NODELIST="other[1-2]")
    d = detect(env)
    assert (d.nnodes, d.master_addr) == (4, "gpu07")


def test_slurm_single_node_and_plain_host() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "laptop"}
    # One node: no fixed port (a free one, as without SLURM).
    assert detect(env) == ClusterDefaults(1, 0, "laptop", None, None, "slurm", "slurm-1")


def test_slurm_missing_pieces_stay_none() -> None:
    expected = ClusterDefaults(2, None, None, job_port("1"), None, "slurm", "slurm-1")
    assert detect({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2"}) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "a,b"},  # no job id
        {"SLURM_JOB_ID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "a,b"},  # no node count
        {"SLURM_JOB_ID": "", "SLURM_NNODES": "2"},  # empty counts as unset
    ],
)
def test_slurm_needs_job_id_and_node_count(env: dict[str, str]) -> None:
    assert detect(env) == ClusterDefaults()


def test_pet_variables_are_not_read_here() -> None:
    """PET_* are torchrun's option fallbacks, read by the CLI (test_cli); SLURM still counts."""
    d = detect({**SLURM, "PET_NNODES": "9", "PET_MASTER_ADDR": "svc"})
    assert (d.source, d.nnodes, d.master_addr) == ("slurm", 4, "gpu07")


def test_values_are_trimmed() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": " 2 ", "SLURM_NODEID": "1\n", "SLURM_JOB_NODELIST": " n[1-2] "}
    assert detect(env) == ClusterDefaults(2, 1, "n1", job_port("1"), None, "slurm", "slurm-1")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (dict(SLURM, SLURM_NNODES="two"), "SLURM_NNODES"),
        (dict(SLURM, SLURM_NNODES="2.0"), "SLURM_NNODES"),
        (dict(SLURM, SLURM_NNODES="0"), "SLURM_NNODES"),
        (
            {**{k: v for k, v in SLURM.items() if k != "SLURM_NNODES"}, "SLURM_JOB_NUM_NODES": "x"},
            "SLURM_JOB_NUM_NODES",
        ),
        (dict(SLURM, SLURM_NODEID="-1"), "SLURM_NODEID"),
        (dict(SLURM, SLURM_NODEID="first"), "SLURM_NODEID"),
        (dict(SLURM, SLURM_JOB_NODELIST="gpu[3-1]"), "SLURM_JOB_NODELIST"),
        (dict(SLURM, SLURM_JOB_NODELIST="gpu["), "SLURM_JOB_NODELIST"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as info:
        detect(env)
    assert "\n" not in str(info.value)


def test_defaults_are_frozen() -> None:
    d = detect(SLURM)
    with pytest.raises(AttributeError):
        d.nnodes = 3  # type: ignore[misc]


def test_imports_neither_grpc_nor_torch() -> None:
    code = (
        "import sys, ddp_launch.cluster; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

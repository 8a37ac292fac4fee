"""Defaults for a multi-node run, read from the cluster the launcher finds itself on.

ddp-launch is not a cluster manager: it runs once per node and needs each node's
``--nnodes``, ``--node-rank`` and ``--master-addr`` (and perhaps ``--master-port`` and
``-n``). On a cluster those are already in the environment:

- Kubernetes, a Kubeflow PyTorchJob: ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT`` and ``PET_NPROC_PER_NODE``. These are torchrun's ``PET_<OPTION>``
  fallbacks, read by the CLI for every option as torchrun's argparse reads them, so they
  are not read here.
- SLURM, one ``srun`` task per node: when ``SLURM_JOB_ID`` (or ``SLURM_JOBID``) and
  ``SLURM_NNODES`` (or ``SLURM_JOB_NUM_NODES``) are set, nnodes is ``SLURM_NNODES``, the node
  rank is ``SLURM_NODEID`` and the master address is the first host of
  ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``), its bracket ranges expanded
  (``gpu[01-03,07]`` -> ``gpu01``). SLURM names no port: the launcher's own default applies.

A variable set to the empty string counts as unset.

Precedence, which the CLI applies field by field: an explicit command-line flag, then its
``PET_*`` variable, then these variables, then the built-in defaults. :func:`detect` only reads; it
never looks at flags, and it imports neither grpc nor torch.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ddp_launch.errors import ConfigError

MAX_HOSTS = 65536  # bound on one expanded host list, so a typo like n[0-999999999] fails fast

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ClusterDefaults:
    """What the environment says about this node's place in a multi-node run.

    A field is None when the environment does not say; ``source`` is ``"kubernetes"``,
    ``"slurm"`` or ``""`` (nothing detected, every field None)."""

    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    nproc_per_node: str | None = None  # as -n takes it: "4", "gpu", "cpu" or "auto"
    source: str = ""
    run_id: str | None = None


# ---------------------------------------------------------------------------- host lists


def _split_top_level(spec: str, whole: str) -> list[str]:
    """Split on the commas outside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    items: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(spec):
        if ch == "[":
            if depth:
                raise ConfigError(f"bad host list {whole!r}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ConfigError(f"bad host list {whole!r}: ']' without '['")
            depth = 0
        elif ch == "," and not depth:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"bad host list {whole!r}: '[' without ']'")
    items.append(spec[start:])
    return items


def _expand_range_set(body: str, whole: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]; each range keeps its start's width."""
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        lo, hi = lo.strip(), hi.strip()
        if not _DIGITS.fullmatch(lo) or (sep and not _DIGITS.fullmatch(hi)):
            raise ConfigError(f"bad host list {whole!r}: {part!r} is not a number or a range N-M")
        if not sep:
            out.append(lo)
            continue
        first, last = int(lo), int(hi)
        if last < first:
            raise ConfigError(f"bad host list {whole!r}: range {part!r} runs backwards")
        if last - first + 1 + len(out) > MAX_HOSTS:
            raise ConfigError(f"bad host list {whole!r}: more than {MAX_HOSTS} hosts")
        width = len(lo)
        out.extend(f"{n:0{width}d}" for n in range(first, last + 1))
    return out


def _expand_item(item: str, whole: str) -> list[str]:
    """One comma-free (outside brackets) item: "rack[1-2]-n[01-02]" -> 4 hosts, the first
    bracket varying slowest, as SLURM orders them."""
    # Alternating pieces: literal, bracket body, literal, bracket body, ..., literal.
    pieces = re.split(r"\[([^\]]*)\]", item)
    choices: list[list[str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if any(c.isspace() for c in piece):
                raise ConfigError(f"bad host list {whole!r}: whitespace inside the host name {item!r}")
            choices.append([piece])
        else:
            if not piece.strip():
                raise ConfigError(f"bad host list {whole!r}: empty brackets in {item!r}")
            choices.append(_expand_range_set(piece, whole))
    count = 1
    for c in choices:
        count *= len(c)
    if count > MAX_HOSTS:
        raise ConfigError(f"bad host list {whole!r}: more than {MAX_HOSTS} hosts")
    return ["".join(parts) for parts in itertools.product(*choices)]


def expand_hostlist(spec: str) -> list[str]:
    """Expand SLURM's compressed host list, keeping its order (and any repeats).

    >>> expand_hostlist("gpu[01-03,07]")
    ['gpu01', 'gpu02', 'gpu03', 'gpu07']
    >>> expand_hostlist("node[1-2],login1")
    ['node1', 'node2', 'login1']
    >>> expand_hostlist("rack[1-2]-n[01-02]")
    ['rack1-n01', 'rack1-n02', 'rack2-n01', 'rack2-n02']

    A range is zero-padded to the width of its start (``[08-10]`` -> 08, 09, 10;
    ``[8-10]`` -> 8, 9, 10). Raises ConfigError, naming the spec, on anything malformed:
    an empty list or item, an unclosed or empty bracket, a non-numeric or backwards range.
    """
    whole = spec
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"bad host list {whole!r}: it is empty")
    hosts: list[str] = []
    for item in _split_top_level(spec, whole):
        item = item.strip()
        if not item:
            raise ConfigError(f"bad host list {whole!r}: an empty entry between commas")
        hosts.extend(_expand_item(item, whole))
        if len(hosts) > MAX_HOSTS:
            raise ConfigError(f"bad host list {whole!r}: more than {MAX_HOSTS} hosts")
    return hosts


# ---------------------------------------------------------------------------- environments


def _get(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of names that is set to something non-blank, as (name, stripped value)."""
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip():
            return name, value.strip()
    return None


def _int(name: str, value: str, minimum: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise ConfigError(f"{name}={value!r} is not a non-negative integer")
    n = int(value)
    if n < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {n}")
    return n


def _from_slurm(environ: Mapping[str, str]) -> ClusterDefaults | None:
    if not _get(environ, "SLURM_JOB_ID", "SLURM_JOBID"):
        return None
    nnodes = _get(environ, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if nnodes is None:
        return None
    rank = _get(environ, "SLURM_NODEID")
    nodelist = _get(environ, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    master_addr = None
    if nodelist is not None:
        name, spec = nodelist
        try:
            master_addr = expand_hostlist(spec)[0]
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    job = _get(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    assert job is not None
    step = _get(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    run_id = f"slurm-{job[1]}" + (f".{step[1]}" if step else "")
    count = _int(*nnodes, minimum=1)
    return ClusterDefaults(
        nnodes=count,
        node_rank=_int(*rank, minimum=0) if rank else None,
        master_addr=master_addr,
        # SLURM names no port. A fixed default would make two jobs sharing nodes collide
        # (the second one's node 1 reached the first one's master); one derived from the job
        # is the same on every node of this job and differs between jobs.
        master_port=job_port(job[1], step[1] if step else "") if count > 1 else None,
        nproc_per_node=None,
        source="slurm",
        run_id=run_id,
    )


# Derived ports: P (DDP's store) and P+1 (the master), P even in [20000, 40000).
JOB_PORT_BASE = 20000
JOB_PORT_SLOTS = 10000


def job_port(job_id: str, step_id: str = "") -> int:
    """The master port of a SLURM job step: the same on every node, different for the jobs
    and steps that could share a node (for 10,000 consecutive job ids)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    # Jobs 7 slots apart (7 is prime to the slot count: 10,000 consecutive jobs stay apart),
    # a job's steps 0-6 in between.
    key = int(digits) * 7 + (int(step_id) if step_id.isdigit() else 0)
    return JOB_PORT_BASE + 2 * (key % JOB_PORT_SLOTS)


def detect(environ: Mapping[str, str]) -> ClusterDefaults:
    """Read the cluster's defaults from environ (pass ``os.environ``): SLURM's variables;
    nothing found -> every field None and source "".

    Raises ConfigError, naming the variable, when a value is malformed (a non-integer
    count or rank, a host list that does not parse)."""
    return _from_slurm(environ) or ClusterDefaults()

"""Multi-process (multi-host) start-up: join the processes of one run into a single JAX runtime.

`launch.sh` starts the processes and describes the run to each of them in three environment variables,
whatever the cluster (local processes, SLURM, or any other scheduler that sets them):

    COORDINATOR_ADDRESS  host:port of process 0's coordination service
    NUM_PROCESSES        how many processes take part
    PROCESS_ID           this process's rank, 0 .. NUM_PROCESSES-1

After `maybe_initialize()`, `jax.devices()` lists every process's devices and jitted computations on a global mesh
run as one SPMD program; each process feeds only its own rows of each batch (`sharding.process_batch_slice`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmjax.errors import UserError

ENV_VARS = ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID")


def cluster_from_env(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(coordinator address, process count, process id) from `env`, or None for a single-process run."""
    given = {name: env[name] for name in ENV_VARS if env.get(name)}
    if not given:
        return None
    missing = [name for name in ENV_VARS if name not in given]
    if missing:
        raise UserError(
            f"multi-process run needs {', '.join(ENV_VARS)} but {', '.join(missing)} is unset: "
            "start it with ./launch.sh, which sets all three"
        )
    address = given["COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"COORDINATOR_ADDRESS={address!r} is not host:port: e.g. COORDINATOR_ADDRESS=node001:12355")
    try:
        count, index = int(given["NUM_PROCESSES"]), int(given["PROCESS_ID"])
    except ValueError:
        raise UserError(
            f"NUM_PROCESSES={given['NUM_PROCESSES']!r} and PROCESS_ID={given['PROCESS_ID']!r} must be integers"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"PROCESS_ID={index} must be in [0, NUM_PROCESSES={count}): check the launcher")
    return address, count, index


def maybe_initialize() -> None:
    """Join the multi-process run described by the environment, if any; call before anything touches devices.

    A no-op for a single process (no variables set, or NUM_PROCESSES=1), so every entry point can call it.
    On CPU the processes' collectives go over gloo (TCP), JAX's default CPU implementation.
    """
    cluster = cluster_from_env(os.environ)
    if cluster is None or cluster[1] == 1 or jax.distributed.is_initialized():
        return
    address, count, index = cluster
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them.

    A decision that leads into a collective (stop and checkpoint after a SIGTERM that reached only some processes,
    or reached them a step apart) must be the same everywhere, or the processes wait on each other forever.
    """
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.bool_(flag)).any())

"""Data parallelism: one `jax.jit` over a 1-D device mesh.

The batch is sharded on the 'data' axis and the train state is replicated.
Under jit, BatchNorm's batch means are means over the *global* batch, so
statistics match a single device running the whole batch.  Several hosts
join through `jax.distributed.initialize` before anything else touches jax.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P



def _on_cluster() -> bool:
  """True when the environment says this process is one of several (JAX, Slurm, Open MPI)."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  return any(int(os.environ.get(name, '1') or 1) > 1
             for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def maybe_initialize_distributed(coordinator_address=None, num_processes=None,
                                 process_id=None) -> None:
  """Connects the hosts: from explicit flags, or auto-detected on a cluster."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_cluster():
    jax.distributed.initialize()  # Cluster auto-detection fills in the rest.


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size <= 0 or global_batch_size % mesh.size:
    raise ValueError(
        f'train.global_batch_size={global_batch_size} must be a positive multiple of the '
        f'{mesh.size} devices (each device takes an equal share of the global batch)')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def global_batch(local_batch: dict, mesh: Mesh,
                 keys=('images', 'available', 'target_index')) -> dict:
  """Per-process numpy batch -> global jax arrays sharded on 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in keys}


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))

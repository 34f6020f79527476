"""Running zdist beyond one machine: cluster objects with one interface, and the Center file.

Every cluster object is a :class:`Cluster` (``center_address``,
``security``, ``scale(n)``, ``adapt(minimum=, maximum=)``, ``close()``, a
context manager) and is taken wherever a Center's address is:
``Pool(cluster)``, ``Executor(cluster)``, ``zdist.dask.get(cluster, ...)``.

>>> from zdist import Pool
>>> from zdist.deploy import LocalCluster
>>> with LocalCluster(n_workers=1) as cluster, Pool(cluster) as pool:
...     pool.gather(pool.map(abs, [-3]))
[3]

:class:`SSHCluster` starts the Center and workers on other machines over SSH
(``pip install 'zdist[ssh]'``). Batch jobs find their Center through the Center file
(``zdist-center --center-file PATH``): :func:`read_center_file`.

The engines: :class:`SLURMCluster`, :class:`PBSCluster`, :class:`LSFCluster`
(:mod:`zdist.deploy.jobqueue`), :class:`KubeCluster`
(:mod:`zdist.deploy.kubernetes`, with kr8s), and inside one MPI job
:mod:`zdist.deploy.mpi` (``zdist-mpi``, with mpi4py).
"""
from ..centerfile import CenterFile, read_center_file, write_center_file
from .adaptive import Adaptive
from .base import Cluster
from .jobqueue import LSFCluster, PBSCluster, SLURMCluster
from .kubernetes import KubeCluster
from .local import LocalCluster
from .ssh import SSHCluster  # asyncssh is imported when an SSHCluster is made

__all__ = [
    "Adaptive", "CenterFile", "Cluster", "KubeCluster", "LSFCluster", "LocalCluster", "PBSCluster", "SLURMCluster", "SSHCluster",
    "read_center_file", "write_center_file",
]

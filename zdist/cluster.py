"""LocalCluster: a Center and workers on 127.0.0.1 (it lives in :mod:`zdist.deploy.local`; this name stays).

>>> from zdist.cluster import LocalCluster
>>> from zdist.deploy import LocalCluster as Same
>>> LocalCluster is Same
True
"""
from .deploy.local import ClusterStartError, LocalCluster, node_environment

__all__ = ["ClusterStartError", "LocalCluster", "node_environment"]

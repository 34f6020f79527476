"""zdist on Kubernetes: the manifests, and :class:`KubeCluster`, which scales the workers' Deployment.

One Center Deployment (a single replica) behind a Service, one worker
Deployment whose ``replicas`` is the number of workers, and the CURVE keys
in a Secret mounted into both: :func:`manifests` writes them (the files in
``deploy/kubernetes/`` are its output for the defaults, checked by the
tests). The Center is ready when ``zdist status`` answers inside its pod;
a worker listens on its pod's IP, is named after its pod, and retires on
SIGTERM (its data goes to the other workers before the pod ends).

>>> [(m['kind'], m['metadata']['name']) for m in manifests('zdist', workers=2)]
[('Deployment', 'zdist-center'), ('Service', 'zdist-center'), ('Deployment', 'zdist-worker')]
>>> manifests('zdist', workers=2)[2]['spec']['replicas']
2

:class:`KubeCluster` talks to the Kubernetes API through kr8s
(``pip install 'zdist[kubernetes]'``). ``KubeCluster(create=True)`` makes a
key pair, the Secret and the objects above, and deletes them on ``close()``;
``KubeCluster(create=False)`` drives a cluster applied from the manifests
(``kubectl apply -f deploy/kubernetes/``), reading its keys from the
Secret. ``scale(n)`` sets the worker Deployment's replicas; ``adapt`` does
so by itself, and when it shrinks it marks the idle workers' pods with the
lowest ``controller.kubernetes.io/pod-deletion-cost`` so that the
ReplicaSet removes those pods and not busy ones.

The Center's address is its Service's DNS name: a client inside the
Kubernetes cluster (a pod, a notebook server) reaches it as it is; from
outside, forward the port (``kubectl port-forward svc/zdist-center 8787``)
and pass ``center_address='127.0.0.1:8787'``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from .base import Cluster

__all__ = ["CENTER_PORT", "DASHBOARD_PORT", "KubeCluster", "manifests"]

CENTER_PORT = 8787
DASHBOARD_PORT = 8790
WORKER_PORT = 8788
#: Where the Secret's key files are mounted in every pod.
KEY_DIR = "/etc/zdist/keys"
#: The label that tells zdist's objects apart, and the one for each part.
LABEL = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def manifests(
    name: str = "zdist",
    *,
    image: str = "zdist:0.1.0",
    workers: int = 2,
    worker_cores: int = 1,
    worker_memory: str = "1Gi",
    secret: str | None = None,
    namespace: str | None = None,
) -> list[dict]:
    """The Center's Deployment and Service and the workers' Deployment, as dicts (see the module's docstring).

    ``secret`` is the Secret holding ``zdist.key`` and ``zdist.key_secret``
    (default ``NAME-keys``; ``kubectl create secret generic NAME-keys
    --from-file=DIR`` after ``zdist-keys DIR``).
    """
    secret = secret or f"{name}-keys"
    center, worker = f"{name}-center", f"{name}-worker"
    meta = (lambda n, component: {"name": n, "labels": {LABEL: name, COMPONENT: component}, **({"namespace": namespace} if namespace else {})})
    key = f"{KEY_DIR}/zdist.key_secret"
    # Readable by the pods' group (fsGroup) only: the containers run as user 1000, not root.
    keys_volume = {"name": "keys", "secret": {"secretName": secret, "defaultMode": 0o440}}
    pod_security = {"fsGroup": 1000}
    keys_mount = {"name": "keys", "mountPath": KEY_DIR, "readOnly": True}
    security = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False}
    status = ["zdist", "status", f"127.0.0.1:{CENTER_PORT}", "--key", key, "--timeout", "3"]
    center_pod = {
        "metadata": {"labels": {LABEL: name, COMPONENT: "center"}},
        "spec": {
            "securityContext": dict(pod_security),
            "containers": [{
                "name": "center",
                "image": image,
                "command": ["zdist-center", "--host", "0.0.0.0", "--port", str(CENTER_PORT), "--dashboard-port", str(DASHBOARD_PORT), "--key", key],
                "ports": [{"name": "center", "containerPort": CENTER_PORT}, {"name": "dashboard", "containerPort": DASHBOARD_PORT}],
                "readinessProbe": {"exec": {"command": list(status)}, "periodSeconds": 5, "timeoutSeconds": 5},
                "livenessProbe": {"exec": {"command": list(status)}, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                "securityContext": dict(security),
                "volumeMounts": [dict(keys_mount)],
            }],
            "volumes": [{**keys_volume, "secret": dict(keys_volume["secret"])}],
        },
    }
    worker_pod = {
        "metadata": {"labels": {LABEL: name, COMPONENT: "worker"}},
        "spec": {
            # SIGTERM retires a worker: its data moves to the others first.
            "terminationGracePeriodSeconds": 60,
            "securityContext": dict(pod_security),
            "containers": [{
                "name": "worker",
                "image": image,
                "command": [
                    "zdist-worker", f"{center}:{CENTER_PORT}", "--host", "$(POD_IP)", "--port", str(WORKER_PORT), "--name", "$(POD_NAME)",
                    "--ncores", str(worker_cores), "--memory-limit", _zdist_memory(worker_memory), "--key", key,
                ],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
                "ports": [{"name": "worker", "containerPort": WORKER_PORT}],
                "resources": {"requests": {"cpu": str(worker_cores), "memory": worker_memory}, "limits": {"cpu": str(worker_cores), "memory": worker_memory}},
                "securityContext": dict(security),
                "volumeMounts": [dict(keys_mount)],
            }],
            "volumes": [{**keys_volume, "secret": dict(keys_volume["secret"])}],
        },
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(center, "center"),
         "spec": {"replicas": 1, "selector": {"matchLabels": {LABEL: name, COMPONENT: "center"}}, "template": center_pod}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(center, "center"),
         "spec": {"selector": {LABEL: name, COMPONENT: "center"},
                  "ports": [{"name": "center", "port": CENTER_PORT, "targetPort": "center"}, {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": "dashboard"}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(worker, "worker"),
         "spec": {"replicas": workers, "selector": {"matchLabels": {LABEL: name, COMPONENT: "worker"}}, "template": worker_pod}},
    ]


def _zdist_memory(quantity: str) -> str:
    """A Kubernetes memory quantity as zdist-worker's --memory-limit: ``'1Gi'`` -> ``'1GiB'``, ``'512M'`` -> ``'512MB'``."""
    return quantity + "B" if quantity[-1:] in ("i", "K", "M", "G", "T") or quantity[-2:] in ("Ki", "Mi", "Gi", "Ti") else quantity


def _kr8s() -> Any:
    try:
        import kr8s
        import kr8s.objects
    except ImportError as exc:
        raise ImportError(f"KubeCluster needs kr8s ({exc}): pip install 'zdist[kubernetes]'") from None
    return kr8s


class KubeCluster(Cluster):
    """zdist on Kubernetes, driven through its API (see the module's docstring).

    ``name`` prefixes every object (``NAME-center``, ``NAME-worker``,
    ``NAME-keys``); ``namespace``, ``kubeconfig`` and ``context`` choose the
    Kubernetes cluster as kubectl would (default: ``$KUBECONFIG`` or
    ``~/.kube/config``, or the pod's service account inside a cluster).
    """

    def __init__(
        self,
        name: str = "zdist",
        *,
        n_workers: int = 2,
        image: str = "zdist:0.1.0",
        worker_cores: int = 1,
        worker_memory: str = "1Gi",
        namespace: str | None = None,
        create: bool = True,
        center_address: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
    ):
        super().__init__()
        self.name = name
        self.n_workers = n_workers
        self.image, self.worker_cores, self.worker_memory = image, worker_cores, worker_memory
        self.create = create
        self._given_address = center_address
        self._kubeconfig, self._context, self._namespace = kubeconfig, context, namespace
        self.api: Any = None
        self.namespace = namespace or "default"
        self._created: list[Any] = []
        self._keys_dir: str | None = None

    # -------------------------------------------------------------- Kubernetes objects

    def _objects(self) -> Any:
        return _kr8s().objects

    def _named(self, kind: str, name: str) -> Any:
        """A handle on the object ``kind``/``name`` of our namespace (no request yet: ``refresh()`` reads it)."""
        return getattr(self._objects(), kind)({"metadata": {"name": name, "namespace": self.namespace}}, api=self.api)

    def _workers(self) -> Any:
        return self._named("Deployment", f"{self.name}-worker")

    def start(self) -> "KubeCluster":
        if self.status != "created":
            return self
        kr8s = _kr8s()
        self.api = kr8s.api(kubeconfig=self._kubeconfig, context=self._context, namespace=self._namespace)
        self.namespace = self._namespace or self.api.namespace or "default"
        try:
            if self.create:
                self._create_objects()
            else:
                self._read_keys()
        except BaseException:
            self._close()
            raise
        self.center_address = self._given_address or f"{self.name}-center.{self.namespace}.svc:{CENTER_PORT}"
        self.dashboard_link = f"http://{self.name}-center.{self.namespace}.svc:{DASHBOARD_PORT}/"
        return super().start()

    def _create_objects(self) -> None:
        from ..security import Security, create_keys

        objects = self._objects()
        self._keys_dir = tempfile.mkdtemp(prefix="zdist-kube-keys-")
        public, secret_file = create_keys(self._keys_dir)
        self.security = Security(key=secret_file)
        with open(public) as f, open(secret_file) as g:
            data = {"zdist.key": f.read(), "zdist.key_secret": g.read()}
        secret = objects.Secret(
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": f"{self.name}-keys", "namespace": self.namespace, "labels": {LABEL: self.name}},
             "stringData": data},
            api=self.api,
        )
        secret.create()
        self._created.append(secret)
        kinds = {"Deployment": objects.Deployment, "Service": objects.Service}
        for manifest in manifests(self.name, image=self.image, workers=self.n_workers, worker_cores=self.worker_cores,
                                  worker_memory=self.worker_memory, namespace=self.namespace):
            obj = kinds[manifest["kind"]](manifest, api=self.api)
            obj.create()
            self._created.append(obj)

    def _read_keys(self) -> None:
        """A cluster applied from the manifests: the client takes its keys from the Secret."""
        import base64

        from ..security import Security

        secret = self._named("Secret", f"{self.name}-keys")
        secret.refresh()
        self._keys_dir = tempfile.mkdtemp(prefix="zdist-kube-keys-")
        old_umask = os.umask(0o077)
        try:
            for file_name in ("zdist.key", "zdist.key_secret"):
                with open(os.path.join(self._keys_dir, file_name), "wb") as f:
                    f.write(base64.b64decode(secret.raw["data"][file_name]))
        finally:
            os.umask(old_umask)
        self.security = Security(key=os.path.join(self._keys_dir, "zdist.key_secret"))

    # -------------------------------------------------------------- Cluster

    def planned_workers(self) -> int:
        """The worker Deployment's ``spec.replicas``."""
        deployment = self._workers()
        deployment.refresh()
        return int(deployment.raw["spec"].get("replicas") or 0)

    def scale(self, n: int, *, _adaptive: bool = False) -> None:
        """Set the worker Deployment's replicas to ``n`` (pods stopped this way retire their workers on SIGTERM)."""
        if n < 0:
            raise ValueError(f"scale needs a number of workers >= 0, got {n}")
        if not _adaptive and self._adaptive is not None:
            self._adaptive.stop()
            self._adaptive = None
        with self._scale_lock:
            self._workers().patch({"spec": {"replicas": n}})

    def retire_workers(self, addresses: list[str], timeout: float = 120.0) -> list[str]:
        """Give back these workers' pods: mark them cheapest to delete, then lower the replicas by as many."""
        with self._scale_lock:
            workers = self.center_info().get("workers", {})
            pods = [str(workers[a].get("name")) for a in addresses if a in workers]
            for pod in pods:
                self._named("Pod", pod).patch({"metadata": {"annotations": {DELETION_COST: "-1000"}}})
            if pods:
                self._workers().patch({"spec": {"replicas": max(0, self.planned_workers() - len(pods))}})
            return [a for a in addresses if a in workers]

    def _close(self) -> None:
        for obj in reversed(self._created):
            try:
                obj.delete()
            except Exception:  # noqa: BLE001 - already gone; delete the rest
                pass
        self._created.clear()
        if self.security is not None:
            self.security = None
        if self._keys_dir:
            shutil.rmtree(self._keys_dir, ignore_errors=True)
            self._keys_dir = None

    def __repr__(self) -> str:
        return f"<KubeCluster {self.name} namespace={self.namespace} center={self.center_address or '-'} {self.status}>"


def manifests_yaml(**options: Any) -> str:
    """:func:`manifests` as one YAML stream (what ``deploy/kubernetes/zdist.yaml`` holds for the defaults)."""
    import yaml

    header = (
        "# zdist on Kubernetes: the Center (Deployment + Service) and the workers (Deployment).\n"
        "# Written by `python -m zdist.deploy.kubernetes` (zdist.deploy.kubernetes.manifests); the tests check\n"
        "# that this file is its output and validate it against the Kubernetes schemas. Needs the Secret\n"
        "# zdist-keys first: zdist-keys keys/ && kubectl create secret generic zdist-keys --from-file=keys/\n"
    )
    return header + "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests(**options))


if __name__ == "__main__":
    print(manifests_yaml(), end="")

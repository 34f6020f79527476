"""zdist on Kubernetes, checked offline: no Kubernetes cluster is reachable here.

- the manifests (deploy/kubernetes/zdist.yaml, and what KubeCluster creates)
  are validated against the Kubernetes API's schemas with kubernetes-validate;
- KubeCluster's requests, made by the real kr8s client over HTTP, are checked
  against a recorded API conversation (tests/data/kubernetes-conversation.json):
  a small HTTP server on 127.0.0.1 replays the recorded responses in order and
  records what was asked. The responses were written in the API's format, not
  captured from a live cluster (the file says so).
- the Dockerfile is checked for what the manifests rely on; it is not built here.
"""
from __future__ import annotations

import http.server
import json
import pathlib
import threading

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kr8s")

from zdist import Center, Worker  # noqa: E402
from zdist.deploy.kubernetes import KubeCluster, manifests, manifests_yaml  # noqa: E402
from zdist.loop import LoopThread  # noqa: E402
from zdist.security import Security  # noqa: E402

from .engines import documented_code  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONVERSATION = json.loads((ROOT / "tests" / "data" / "kubernetes-conversation.json").read_text())
NAMESPACE = CONVERSATION["namespace"]
#: The Kubernetes version whose schemas the manifests are checked against.
KUBERNETES_VERSION = "1.31.0"


def validate(document: dict) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)  # raises on any schema error or unknown field


# ------------------------------------------------------------------ manifests and image


def test_deploy_manifests_are_what_manifests_writes():
    path = ROOT / "deploy" / "kubernetes" / "zdist.yaml"
    assert path.read_text() == manifests_yaml(), "deploy/kubernetes/zdist.yaml is stale: python -m zdist.deploy.kubernetes > deploy/kubernetes/zdist.yaml"


def test_manifests_validate_against_the_kubernetes_schemas():
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "zdist.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "Deployment"]
    for document in documents + manifests("big", workers=50, worker_cores=8, worker_memory="64Gi", namespace="science"):
        validate(document)


def test_manifests_wire_keys_probe_and_pod_identity():
    center, service, workers = manifests("zdist", workers=3)
    center_container = center["spec"]["template"]["spec"]["containers"][0]
    assert center_container["readinessProbe"]["exec"]["command"][:3] == ["zdist", "status", "127.0.0.1:8787"]
    assert "--key" in center_container["command"]
    assert service["spec"]["selector"] == center["spec"]["template"]["metadata"]["labels"]
    worker_spec = workers["spec"]["template"]["spec"]
    command = worker_spec["containers"][0]["command"]
    assert command[:2] == ["zdist-worker", "zdist-center:8787"] and "$(POD_IP)" in command and "$(POD_NAME)" in command
    assert worker_spec["volumes"][0]["secret"]["secretName"] == "zdist-keys"
    assert workers["spec"]["replicas"] == 3


def test_dockerfile_provides_what_the_manifests_run():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "useradd --uid 1000" in dockerfile and "USER 1000" in dockerfile  # runAsNonRoot, runAsUser 1000
    assert "EXPOSE 8787 8790 8788" in dockerfile


# ------------------------------------------------------------------ the recorded API conversation


class Replay(http.server.ThreadingHTTPServer):
    """Answers each request with the next recorded response, and records the request."""

    def __init__(self, exchanges: list[dict]):
        super().__init__(("127.0.0.1", 0), ReplayHandler)
        self.exchanges = list(exchanges)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def kubeconfig(self, directory: pathlib.Path) -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "replay",
            "clusters": [{"name": "replay", "cluster": {"server": f"http://127.0.0.1:{self.server_port}"}}],
            "users": [{"name": "tester", "user": {"token": "recorded-conversation"}}],
            "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "tester", "namespace": NAMESPACE}}],
        }
        path = directory / "kubeconfig.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(10)


class ReplayHandler(http.server.BaseHTTPRequestHandler):
    server: Replay

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path = self.path.split("?")[0].rstrip("/")
        with self.server.lock:
            self.server.requests.append({"method": self.command, "path": path, "content_type": self.headers.get("content-type"), "body": body,
                                         "authorization": self.headers.get("authorization")})
            expected = self.server.exchanges.pop(0) if self.server.exchanges else None
        if expected is None or (expected["method"], expected["path"]) != (self.command, path):
            status, answer = 500, {"kind": "Status", "status": "Failure", "code": 500, "message": f"not in the recorded conversation: {self.command} {path}; expected {expected}"}
        else:
            status, answer = expected["status"], expected["body"]
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def replay():
    servers: list[Replay] = []

    def start(name: str) -> Replay:
        servers.append(Replay(CONVERSATION[name]))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def asked(server: Replay) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in server.requests]


def recorded(name: str) -> list[tuple[str, str]]:
    return [(e["method"], e["path"]) for e in CONVERSATION[name]]


def test_kubecluster_creates_scales_and_deletes(replay, tmp_path):
    server = replay("create")
    with KubeCluster(n_workers=2, image="registry.example/zdist:0.1.0", kubeconfig=server.kubeconfig(tmp_path)) as cluster:
        assert cluster.center_address == f"zdist-center.{NAMESPACE}.svc:8787"
        assert cluster.security is not None
        public_key = cluster.security.public_key.decode()
        cluster.scale(3)
        assert cluster.planned_workers() == 3
        assert "zdist" in repr(cluster) and NAMESPACE in repr(cluster)
    assert asked(server) == recorded("create")
    assert all(r["authorization"] == "Bearer recorded-conversation" for r in server.requests)
    posts = [r["body"] for r in server.requests if r["method"] == "POST"]
    secret, center, service, workers = posts
    # The Secret carries the key pair the client itself uses.
    assert public_key in secret["stringData"]["zdist.key"] and public_key in secret["stringData"]["zdist.key_secret"]
    assert set(secret["stringData"]) == {"zdist.key", "zdist.key_secret"}
    assert [center["metadata"]["name"], service["metadata"]["name"], workers["metadata"]["name"]] == ["zdist-center", "zdist-center", "zdist-worker"]
    assert workers["spec"]["replicas"] == 2
    assert workers["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/zdist:0.1.0"
    for document in posts:
        validate(document)
    patch = next(r for r in server.requests if r["method"] == "PATCH")
    assert patch["body"] == {"spec": {"replicas": 3}} and patch["content_type"] == "application/merge-patch+json"


def test_kubecluster_attaches_reads_keys_and_retires_chosen_pods(replay, tmp_path):
    server = replay("attach")
    pod = CONVERSATION["worker_pod"]
    with KubeCluster(create=False, kubeconfig=server.kubeconfig(tmp_path), center_address="127.0.0.1:1") as cluster:
        # The keys came from the Secret: a Center and a worker (named after its pod) with them, on loopback.
        keys = Security(key=cluster.security.key_file)
        thread = LoopThread("kube-test")
        center = Center("127.0.0.1", 0, security=keys)
        thread.run(center.start(), 10)
        worker = Worker(center.address, "127.0.0.1", 0, name=pod, ncores=1, security=keys)
        try:
            thread.run(worker.start(), 10)
            thread.run(worker.registered.wait(), 10)
            cluster.center_address = center.address
            assert cluster.retire_workers([worker.address]) == [worker.address]
        finally:
            thread.run(worker.stop(), 10)
            thread.run(center.stop(), 10)
            thread.stop()
    assert asked(server) == recorded("attach")  # and no DELETE: this cluster was not ours to remove
    annotate, _, shrink = (r for r in server.requests if r["method"] in ("PATCH", "GET") and r["path"] != "/version" and "secrets" not in r["path"])
    assert annotate["body"] == {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}}
    assert shrink["body"] == {"spec": {"replicas": 2}}


def test_the_deploying_page_example_makes_the_recorded_requests(replay, tmp_path, monkeypatch, capsys):
    server = replay("create")
    monkeypatch.setenv("KUBECONFIG", server.kubeconfig(tmp_path))
    page = ROOT / "docs" / "deploying-kubernetes.md"
    exec(compile(documented_code(str(page)), str(page), "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out == "3\n"
    assert asked(server) == recorded("create")

"""CURVE authentication and encryption, through pyzmq's own ``zmq.auth``.

A worker runs whatever pickled function reaches its port, so whoever can
reach that port owns the machine. With a :class:`Security` every socket of
a node or client speaks CURVE: traffic is encrypted, and a node only accepts
peers whose public key sits in its authorized-keys directory.

By default one key pair serves a whole cluster (``zdist-keys DIR`` writes
``DIR/zdist.key`` and ``DIR/zdist.key_secret``; every node and client is
given the secret file, and the directory holds the public key). Per-node key
pairs work too: put every node's and client's public key in the authorized
directory; clients learn a worker's public key from the (already
authenticated) Center.

>>> import tempfile, os
>>> directory = tempfile.mkdtemp()
>>> public, secret = create_keys(directory)
>>> os.path.basename(secret), oct(os.stat(secret).st_mode & 0o777)
('zdist.key_secret', '0o600')
>>> Security(key=secret).public_key == load_public_key(public)
True
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger("zdist.security")


def create_keys(directory: str, name: str = "zdist") -> tuple[str, str]:
    """Write a key pair ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (owner-only)."""
    os.makedirs(directory, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file never exists readable by others, even briefly
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_public_key(path: str) -> bytes:
    public, _ = zmq.auth.load_certificate(path)
    return public


class _LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, saying out loud whom it refused."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer_address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        if status_code != b"200":
            logger.warning(
                "refused a connection from %s: %s (its key is not in the authorized keys)",
                getattr(self, "_peer_address", "?"),
                status_text.decode(errors="replace"),
            )
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


_authenticators: dict[int, _LoggingAuthenticator] = {}
_authenticators_lock = threading.Lock()


def _ensure_authenticator(context: zmq.Context, authorized_keys: str) -> None:
    """One ZAP handler per context; it runs on its own thread, so it serves
    nodes on any event loop of this process."""
    with _authenticators_lock:
        auth = _authenticators.get(id(context))
        if auth is None:
            auth = _LoggingAuthenticator(context)
            auth.start()
            _authenticators[id(context)] = auth
        auth.configure_curve(domain="*", location=authorized_keys)


class Security:
    """The keys of one node or client.

    ``key`` is a secret key file written by ``zdist-keys``;
    ``authorized_keys`` is a directory of public keys allowed to connect
    (default: the key file's own directory). Both may start with ``~``, as
    in the docs' ``Security(key='~/.zdist/zdist.key_secret')``.
    """

    def __init__(self, key: str, authorized_keys: str | None = None):
        self.key_file = os.path.abspath(os.path.expanduser(key))
        if not os.path.exists(self.key_file):
            raise FileNotFoundError(f"no key file at {self.key_file}; create a key pair with `zdist-keys DIR`")
        public, secret = zmq.auth.load_certificate(self.key_file)
        if secret is None:
            raise ValueError(f"{self.key_file} holds only a public key; pass the secret key file (NAME.key_secret)")
        self.public_key: bytes = public
        self.secret_key: bytes = secret
        self.authorized_keys = os.path.abspath(os.path.expanduser(authorized_keys) if authorized_keys else os.path.dirname(self.key_file))
        if not os.path.isdir(self.authorized_keys):
            raise NotADirectoryError(f"authorized keys must be a directory of public key files, got {self.authorized_keys}")
        #: Public keys of nodes whose key pair differs from ours, by address.
        self.server_keys: dict[str, bytes] = {}
        self.directory: str | None = None

    @classmethod
    def temporary(cls) -> "Security":
        """A fresh key pair in a temporary directory (remove it with :meth:`cleanup`)."""
        directory = tempfile.mkdtemp(prefix="zdist-keys-")
        _, secret = create_keys(directory)
        security = cls(key=secret)
        security.directory = directory
        return security

    def cleanup(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def server_socket_setup(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server that admits only authorized keys."""
        _ensure_authenticator(sock.context, self.authorized_keys)
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def client_socket_setup(self, sock: zmq.Socket, address: str | None = None) -> None:
        """Make ``sock`` a CURVE client of the node at ``address``."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_keys.get(address, self.public_key) if address else self.public_key

    def learn(self, workers: dict) -> None:
        """Remember the public keys that workers told the Center (``workers()`` reply)."""
        for address, info in workers.items():
            key = info.get("public_key") if isinstance(info, dict) else None
            if isinstance(key, str) and key.encode() != self.public_key:
                self.server_keys[address] = key.encode()

    @property
    def public_key_text(self) -> str:
        return self.public_key.decode()

    def __repr__(self) -> str:
        return f"Security(key={self.key_file!r}, authorized_keys={self.authorized_keys!r})"

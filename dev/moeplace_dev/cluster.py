"""A local control plane on loopback: etcd + kube-apiserver + Prometheus, for e2e tests and the demo.

Two ways to use it:

* in-process, for tests: ``start_control_plane(workdir)`` and ``start_prometheus(workdir, targets)``
  return handles whose child processes die with the calling thread (``setpriv --pdeathsig``), so a
  killed test run leaves nothing behind. Call them from a thread that outlives the cluster (the main
  thread in pytest and the CLI).
* persistent, for the CLI: ``cluster_up()`` starts the same components detached and records them in
  ``~/.cache/moeplace/cluster/state.json``; ``cluster_env_lines()`` and ``cluster_down()`` read it back.

Identities: kube-apiserver 1.20 reads ``--token-auth-file`` once at start, so tokens cannot be added to a
running server. Instead a fixed set of named users gets a static token at start (``admin`` in
``system:masters``, plus ``DEFAULT_USERS``: ``operator`` for tests that bind the operator's ClusterRole,
``nobody`` that tests never bind), and ``LocalCluster.service_account_token`` mints tokens for service
accounts at any time through the TokenRequest API.

Environment: ``MOEPLACE_CACHE_DIR`` (default ``~/.cache/moeplace``: binaries and build tree, shared with
``scripts/system-deps.sh``), ``MOEPLACE_CLUSTER_DIR`` (default ``$MOEPLACE_CACHE_DIR/cluster``: the
persistent cluster), ``MOEPLACE_KUBE_APISERVER`` / ``MOEPLACE_ETCD`` / ``MOEPLACE_PROMETHEUS`` (binaries
to use instead), ``MOEPLACE_USE_EXISTING_KUBECONFIG`` (``cluster up`` keeps ``$KUBECONFIG``).

Every listener is on 127.0.0.1 and nothing here contacts any other address.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_DEPS_SCRIPT = REPO_ROOT / "scripts" / "system-deps.sh"
CLUSTER_NAME = "moeplace-local"
ADMIN_USER = "admin"
ADMIN_GROUPS = ("system:masters",)
# Static identities created at every start; see the module docstring for why they cannot be added later.
DEFAULT_USERS: Mapping[str, tuple[str, ...]] = MappingProxyType({"operator": (), "nobody": ()})
PROMETHEUS_JOB = "moeplace"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

BINARY_ENV_VARS = {
    "kube_apiserver": "MOEPLACE_KUBE_APISERVER",
    "etcd": "MOEPLACE_ETCD",
    "prometheus": "MOEPLACE_PROMETHEUS",
}
USE_EXISTING_KUBECONFIG_ENV = "MOEPLACE_USE_EXISTING_KUBECONFIG"

_DURATION_RE = re.compile(r"^[1-9][0-9]*(ms|s|m|h|d|w|y)$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# tokens.csv is comma-separated with a double-quoted group list; these characters would corrupt it.
_TOKEN_FILE_FORBIDDEN = re.compile(r'[,"\n\r]')


class ClusterError(RuntimeError):
    """A local control-plane component could not be installed, started, stopped or reached."""


# ---------------------------------------------------------------------------------------------------
# Binaries


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the three executables the local control plane runs."""

    kube_apiserver: Path
    etcd: Path
    prometheus: Path


def cache_dir() -> Path:
    """Where binaries, the build tree and the persistent cluster live (``MOEPLACE_CACHE_DIR`` overrides)."""
    override = os.environ.get("MOEPLACE_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "moeplace"


def _find_binaries() -> tuple[dict[str, Path], list[str]]:
    """Resolve each binary from its env override or default location; return (found, missing names)."""
    defaults = {
        "kube_apiserver": str(cache_dir() / "bin" / "kube-apiserver"),
        "etcd": "etcd",
        "prometheus": "prometheus",
    }
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name, default in defaults.items():
        env_var = BINARY_ENV_VARS[name]
        override = os.environ.get(env_var)
        if override:
            # An explicit override that does not resolve is a user error, not a reason to build.
            resolved = shutil.which(override)
            if resolved is None:
                raise ClusterError(f"{env_var}={override!r} is not an executable file")
            found[name] = Path(resolved)
            continue
        resolved = shutil.which(default)
        if resolved is None:
            missing.append(name)
        else:
            found[name] = Path(resolved)
    return found, missing


def ensure_binaries() -> Binaries:
    """Return the control plane's binaries, running ``scripts/system-deps.sh`` first if any is missing.

    The first run installs etcd and Prometheus from Debian and builds kube-apiserver (about 5 minutes
    on 2 cores); later runs find everything cached and return at once.
    """
    found, missing = _find_binaries()
    if missing:
        if not SYSTEM_DEPS_SCRIPT.is_file():
            raise ClusterError(
                f"missing {', '.join(missing)} and {SYSTEM_DEPS_SCRIPT} does not exist (is moeplace "
                f"installed outside its source tree?); set {', '.join(BINARY_ENV_VARS.values())}"
            )
        print(
            f"moeplace: {', '.join(missing)} missing; running {SYSTEM_DEPS_SCRIPT} "
            "(the first run builds kube-apiserver, about 5 minutes)",
            file=sys.stderr,
            flush=True,
        )
        # The script's progress goes to stderr (fd 2) so `moeplace cluster ...` stdout stays clean.
        result = subprocess.run(
            ["bash", str(SYSTEM_DEPS_SCRIPT)],
            stdin=subprocess.DEVNULL,
            stdout=2,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"{SYSTEM_DEPS_SCRIPT} failed with exit status {result.returncode}")
        found, missing = _find_binaries()
        if missing:
            raise ClusterError(f"{SYSTEM_DEPS_SCRIPT} succeeded but {', '.join(missing)} is still missing")
    return Binaries(**found)


def _binary(name: str) -> Path:
    """One binary, installed only if missing: Prometheus alone must not wait for an apiserver build."""
    found, _missing = _find_binaries()
    return found[name] if name in found else getattr(ensure_binaries(), name)


# ---------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # Holding every socket open until all are chosen guarantees the ports are distinct.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return (state letter, start time in clock ticks) of a live pid, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last ')' do not.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


@dataclass
class ManagedProcess:
    """A child process this module started.

    It is identified by pid *and* kernel start time, so a ``down`` run long after ``up`` never signals
    an unrelated process that happens to have reused the pid.
    """

    name: str
    pid: int
    start_ticks: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def spawn(cls, name: str, argv: Sequence[str], log_path: Path, *, detached: bool) -> ManagedProcess:
        """Start ``argv`` with output appended to ``log_path``.

        ``detached`` puts it in its own session so it outlives this Python process (``cluster up``);
        otherwise it gets SIGKILL when the calling thread exits, so tests never leak servers.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = list(argv)
        setpriv = shutil.which("setpriv")
        if not detached and setpriv is not None:
            # KILL, not TERM: all siblings get the signal at once, and kube-apiserver's graceful
            # shutdown hangs retrying an etcd that has already exited.
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=detached,
            )
        stat = _proc_stat(popen.pid)
        # A process that died instantly has no /proc entry; 0 never matches, so it reads as stopped.
        return cls(name, popen.pid, stat[1] if stat else 0, log_path, popen)

    def is_running(self) -> bool:
        """Whether the process is still alive (zombies count as stopped)."""
        if self.popen is not None:
            return self.popen.poll() is None
        stat = _proc_stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_ticks

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds. Safe to repeat."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.is_running():
                return
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while self.is_running() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.is_running():
            raise ClusterError(f"{self.name} (pid {self.pid}) survived SIGKILL")

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the process's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def to_state(self) -> dict[str, Any]:
        """JSON-ready description for the persistent state file."""
        return {
            "name": self.name,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "log": str(self.log_path),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ManagedProcess:
        """Inverse of ``to_state``; the result can check and stop the process but not reap it."""
        return cls(state["name"], int(state["pid"]), int(state["start_ticks"]), Path(state["log"]))


def _wait_until(
    check: Callable[[], bool], what: str, processes: Sequence[ManagedProcess], timeout: float
) -> None:
    """Poll ``check`` until true; fail fast with the log if a process dies, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if not process.is_running():
                raise ClusterError(
                    f"{process.name} exited while waiting for {what}; last lines of {process.log_path}:\n"
                    f"{process.log_tail()}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path}:\n{p.log_tail()}" for p in processes)
            raise ClusterError(f"{what} not ready after {timeout:.0f}s\n{logs}")
        time.sleep(0.2)


def _http(
    url: str,
    *,
    method: str = "GET",
    token: str | None = None,
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP(S) request to a loopback server; returns (status, body), with status 0 if unreachable."""
    if urllib.parse.urlsplit(url).hostname != LOOPBACK:
        raise ClusterError(f"refusing to contact {url}: the local control plane only talks to {LOOPBACK}")
    headers = {"Accept": "application/json"}
    data = None
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    # kube-apiserver serves a self-signed certificate it generated itself; there is nothing to verify
    # against, and the connection never leaves the machine.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _write_private(path: Path, text: str) -> None:
    """Write a file holding secrets: owner-only permissions, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# kube-apiserver + etcd


def build_kubeconfig(
    server: str, user: str, token: str, *, cluster_name: str = CLUSTER_NAME
) -> dict[str, Any]:
    """A kubeconfig (as a dict) for one bearer-token user of an apiserver with a self-signed cert."""
    if not server.startswith("https://"):
        raise ClusterError(f"kubeconfig server must be an https:// URL, got {server!r}")
    if not user:
        raise ClusterError("kubeconfig user name must not be empty")
    if not token:
        raise ClusterError(f"kubeconfig token for user {user!r} must not be empty")
    context = f"{user}@{cluster_name}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": context,
        "preferences": {},
    }


def render_token_file(users: Mapping[str, Sequence[str]], tokens: Mapping[str, str]) -> str:
    """The ``--token-auth-file`` CSV: one ``token,user,uid,"group1,group2"`` line per user."""
    lines = []
    for user, groups in users.items():
        for value in (user, *groups):
            if not value or _TOKEN_FILE_FORBIDDEN.search(value):
                raise ClusterError(f"user or group name {value!r} must be non-empty without , \" or newlines")
        token = tokens[user]
        line = f"{token},{user},{user}"
        if groups:
            line += ',"' + ",".join(groups) + '"'
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class LocalCluster:
    """A running etcd + kube-apiserver on loopback. Use as a context manager or call ``stop()``."""

    workdir: Path
    server: str
    kubeconfig: Path
    tokens: dict[str, str]
    processes: list[ManagedProcess]

    @property
    def admin_token(self) -> str:
        """Bearer token of ``admin`` (group ``system:masters``: bypasses RBAC)."""
        return self.tokens[ADMIN_USER]

    def token_for(self, user: str) -> str:
        """The static token of a user created at start (``admin`` or one of its ``users``)."""
        try:
            return self.tokens[user]
        except KeyError:
            raise ClusterError(
                f"no static token for user {user!r}: tokens exist only for {sorted(self.tokens)}, since "
                "kube-apiserver reads its token file once at start; pass users= to start_control_plane "
                "or use service_account_token()"
            ) from None

    def kubeconfig_for(self, user: str, token: str | None = None) -> Path:
        """Write (or rewrite) a kubeconfig for ``user`` and return its path.

        Without ``token`` the user's static token is used; pass one from ``service_account_token`` to
        get a kubeconfig for a service account.
        """
        config = build_kubeconfig(self.server, user, token if token is not None else self.token_for(user))
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "-", user)
        path = self.workdir / f"kubeconfig-{safe_name}"
        _write_private(path, yaml.safe_dump(config, sort_keys=False))
        return path

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """Mint a token for service account ``namespace/name`` via TokenRequest, creating it if absent.

        The identity is ``system:serviceaccount:<namespace>:<name>``, so tests can check the exact
        bindings a Helm chart gives the operator's service account.
        """
        base = f"{self.server}/api/v1/namespaces/{namespace}/serviceaccounts"
        status, body = _http(
            base,
            method="POST",
            token=self.admin_token,
            body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )
        if status not in (201, 409):
            raise ClusterError(f"creating service account {namespace}/{name} failed: HTTP {status} {body!r}")
        status, body = _http(
            f"{base}/{name}/token",
            method="POST",
            token=self.admin_token,
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        if status != 201:
            raise ClusterError(f"token request for {namespace}/{name} failed: HTTP {status} {body!r}")
        return str(json.loads(body)["status"]["token"])

    def is_running(self) -> bool:
        """Whether etcd and kube-apiserver are both alive."""
        return all(process.is_running() for process in self.processes)

    def stop(self) -> None:
        """Stop kube-apiserver then etcd, and delete data and secrets; logs stay for post-mortems."""
        # The apiserver goes first: stopping etcd under it makes it spin on reconnects until killed.
        for process in reversed(self.processes):
            process.stop()
        for leftover in ("etcd-data", "pki", "tokens.csv"):
            path = self.workdir / leftover
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for kubeconfig in self.workdir.glob("kubeconfig*"):
            kubeconfig.unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def to_state(self) -> dict[str, Any]:
        """JSON-ready description for the persistent state file (holds tokens: keep it private)."""
        return {
            "workdir": str(self.workdir),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "tokens": self.tokens,
            "processes": [process.to_state() for process in self.processes],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LocalCluster:
        """Inverse of ``to_state``, for ``cluster down`` in a later process."""
        return cls(
            workdir=Path(state["workdir"]),
            server=state["server"],
            kubeconfig=Path(state["kubeconfig"]),
            tokens=dict(state["tokens"]),
            processes=[ManagedProcess.from_state(p) for p in state["processes"]],
        )


def _generate_rsa_key(path: Path) -> Path:
    """A 2048-bit RSA private key written to ``path`` by openssl (the service-account signing key)."""
    keygen = subprocess.run(
        ["openssl", "genrsa", "-out", str(path), "2048"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if keygen.returncode != 0:
        raise ClusterError(f"openssl genrsa failed: {keygen.stderr.strip()}")
    return path


def _etcd_argv(etcd: Path, data_dir: Path, client_url: str, peer_url: str) -> list[str]:
    """A single-member etcd on loopback."""
    return [
        str(etcd),
        "--name=moeplace",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        # Spelled out so etcd never even names the default localhost:2380 peer address.
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=moeplace={peer_url}",
    ]


def _apiserver_argv(
    kube_apiserver: Path, etcd_url: str, port: int, pki: Path, service_account_key: Path, token_file: Path
) -> list[str]:
    """kube-apiserver on loopback with static tokens and real RBAC."""
    return [
        str(kube_apiserver),
        f"--etcd-servers={etcd_url}",
        f"--secure-port={port}",
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        # 1.20 still opens an unauthenticated HTTP port on 8080 by default: never want it.
        "--insecure-port=0",
        f"--cert-dir={pki / 'serving'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={service_account_key}",
        f"--service-account-signing-key-file={service_account_key}",
        f"--token-auth-file={token_file}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        # No controller-manager runs, so the ServiceAccount admission plugin would reject every
        # pod waiting for token secrets that never appear.
        "--disable-admission-plugins=ServiceAccount",
        "--allow-privileged=true",
        "--profiling=false",
    ]


def start_control_plane(
    workdir: Path,
    *,
    users: Mapping[str, Sequence[str]] = DEFAULT_USERS,
    timeout: float = STARTUP_TIMEOUT_S,
    detached: bool = False,
) -> LocalCluster:
    """Start etcd and kube-apiserver on free loopback ports under ``workdir`` and wait for ``/readyz``.

    ``users`` maps extra user names to their groups; each gets a static token (``admin`` always exists
    and is in ``system:masters``). Authorization is real RBAC. ``workdir`` must not hold a previous
    cluster's data. ``detached`` is for ``cluster up``: the processes then outlive this process.
    """
    if ADMIN_USER in users:
        raise ClusterError(f"user name {ADMIN_USER!r} is reserved for the system:masters token")
    all_users = {ADMIN_USER: ADMIN_GROUPS, **users}
    tokens = {user: secrets.token_hex(24) for user in all_users}
    token_file_text = render_token_file(all_users, tokens)
    # Resolved after the arguments are checked, so bad input never waits on an install.
    binaries = ensure_binaries()
    workdir = workdir.resolve()
    if (workdir / "etcd-data").exists():
        raise ClusterError(
            f"{workdir} already holds a cluster's etcd-data: stop that cluster or use a new directory"
        )
    pki = workdir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    logs = workdir / "logs"

    service_account_key = _generate_rsa_key(pki / "service-account.key")
    token_file = workdir / "tokens.csv"
    _write_private(token_file, token_file_text)

    etcd_port, peer_port, apiserver_port = _free_ports(3)
    etcd_url = f"http://{LOOPBACK}:{etcd_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    server = f"https://{LOOPBACK}:{apiserver_port}"
    processes: list[ManagedProcess] = []
    try:
        etcd = ManagedProcess.spawn(
            "etcd", _etcd_argv(binaries.etcd, workdir / "etcd-data", etcd_url, peer_url), logs / "etcd.log",
            detached=detached,
        )
        processes.append(etcd)
        _wait_until(
            lambda: _http(f"{etcd_url}/health")[0] == 200, "etcd /health", processes, timeout
        )
        apiserver_argv = _apiserver_argv(
            binaries.kube_apiserver, etcd_url, apiserver_port, pki, service_account_key, token_file
        )
        apiserver = ManagedProcess.spawn(
            "kube-apiserver", apiserver_argv, logs / "kube-apiserver.log", detached=detached
        )
        processes.append(apiserver)
        _wait_until(
            lambda: _http(f"{server}/readyz", token=tokens[ADMIN_USER]) == (200, b"ok"),
            "kube-apiserver /readyz",
            processes,
            timeout,
        )
        kubeconfig = workdir / "kubeconfig"
        admin_config = build_kubeconfig(server, ADMIN_USER, tokens[ADMIN_USER])
        _write_private(kubeconfig, yaml.safe_dump(admin_config, sort_keys=False))
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise
    return LocalCluster(workdir, server, kubeconfig, tokens, processes)


# ---------------------------------------------------------------------------------------------------
# Prometheus


def validate_duration(value: str, what: str = "duration") -> str:
    """Check a Prometheus duration such as ``1s`` or ``500ms``; return it unchanged."""
    if not _DURATION_RE.match(value):
        raise ClusterError(f"{what} {value!r} is not a Prometheus duration like '1s', '500ms' or '1m'")
    return value


def build_target_groups(
    targets: Sequence[str], labels: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The ``file_sd`` JSON content for ``host:port`` targets sharing ``labels``."""
    if isinstance(targets, str):
        raise ClusterError(f"targets must be a list of 'host:port' strings, got the string {targets!r}")
    for target in targets:
        host, _, port = target.rpartition(":")
        if not host or "/" in target or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(f"scrape target {target!r} is not 'host:port' (no scheme, no path)")
    labels = dict(labels or {})
    for name, value in labels.items():
        if not _LABEL_NAME_RE.match(name) or name.startswith("__"):
            raise ClusterError(f"label name {name!r} is not a valid, non-reserved Prometheus label name")
        if not isinstance(value, str):
            raise ClusterError(f"label {name!r} must have a string value, got {value!r}")
    if not targets:
        # Prometheus accepts an empty list: the job simply has no targets until set_targets() adds some.
        return []
    return [{"targets": list(targets), "labels": labels}]


def build_prometheus_config(targets_file: Path, scrape_interval: str = "1s") -> dict[str, Any]:
    """A prometheus.yml (as a dict) with one job whose targets come from ``targets_file`` (file_sd)."""
    validate_duration(scrape_interval, "scrape_interval")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": PROMETHEUS_JOB,
                "scrape_interval": scrape_interval,
                # Prometheus watches the file (inotify); the refresh interval is only a fallback.
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
            }
        ],
    }


@dataclass
class PrometheusServer:
    """A running Prometheus on loopback whose scrape targets live in a file_sd JSON file."""

    workdir: Path
    url: str
    targets_file: Path
    process: ManagedProcess

    def set_targets(self, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Replace the scrape targets.

        Prometheus sees the file change at once but applies discovery updates on a 5 s tick, so new
        targets are scraped within about 5 s plus one scrape interval.
        """
        write_targets_file(self.targets_file, targets, labels)

    def reload(self) -> None:
        """Make Prometheus re-read its configuration (POST /-/reload)."""
        status, body = _http(f"{self.url}/-/reload", method="POST")
        if status != 200:
            raise ClusterError(f"Prometheus reload failed: HTTP {status} {body!r}")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Run an instant PromQL query, now or ``at`` (epoch seconds); return the ``result`` list of the
        response's ``data``."""
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        status, body = _http(f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params))
        if status != 200:
            raise ClusterError(f"Prometheus query {promql!r} failed: HTTP {status} {body!r}")
        return list(json.loads(body)["data"]["result"])

    def is_running(self) -> bool:
        """Whether the Prometheus process is alive."""
        return self.process.is_running()

    def stop(self) -> None:
        """Stop Prometheus and delete its TSDB; the config, targets and log stay."""
        self.process.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def to_state(self) -> dict[str, Any]:
        """JSON-ready description for the persistent state file."""
        return {
            "workdir": str(self.workdir),
            "url": self.url,
            "targets_file": str(self.targets_file),
            "process": self.process.to_state(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrometheusServer:
        """Inverse of ``to_state``, for ``cluster down`` and for tools that add targets later."""
        return cls(
            workdir=Path(state["workdir"]),
            url=state["url"],
            targets_file=Path(state["targets_file"]),
            process=ManagedProcess.from_state(state["process"]),
        )


def write_targets_file(path: Path, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
    """Atomically write a file_sd JSON file, so Prometheus never reads a half-written one."""
    groups = build_target_groups(targets, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)


def start_prometheus(
    workdir: Path,
    scrape_targets: Sequence[str] | Path = (),
    scrape_interval: str = "1s",
    *,
    labels: Mapping[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
    detached: bool = False,
) -> PrometheusServer:
    """Start Prometheus on a free loopback port with its config and TSDB under ``workdir``.

    ``scrape_targets`` is either a list of ``host:port`` strings (written to ``workdir/targets.json``
    with ``labels``) or the path of a file_sd JSON file the caller maintains. Either way targets can
    change at runtime by rewriting the file (``PrometheusServer.set_targets``).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(scrape_targets, Path):
        if labels is not None:
            raise ClusterError("labels apply only to a list of targets, not to a file_sd path")
        if scrape_targets.suffix not in (".json", ".yml", ".yaml"):
            # Prometheus ignores file_sd files with any other extension, silently scraping nothing.
            raise ClusterError(f"file_sd path {scrape_targets} must end in .json, .yml or .yaml")
        targets_file = scrape_targets.resolve()
    else:
        targets_file = workdir / "targets.json"
        write_targets_file(targets_file, scrape_targets, labels)
    config_file = workdir / "prometheus.yml"
    config = build_prometheus_config(targets_file, scrape_interval)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # Resolved after the arguments are checked, so bad input never waits on an install.
    prometheus_binary = _binary("prometheus")

    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    process = ManagedProcess.spawn(
        "prometheus",
        [
            str(prometheus_binary),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
            "--web.enable-lifecycle",
        ],
        workdir / "prometheus.log",
        detached=detached,
    )
    try:
        _wait_until(lambda: _http(f"{url}/-/ready")[0] == 200, "Prometheus /-/ready", [process], timeout)
    except BaseException:
        process.stop()
        raise
    return PrometheusServer(workdir, url, targets_file, process)


# ---------------------------------------------------------------------------------------------------
# Persistent mode (moeplace cluster up | env | down)


def state_dir() -> Path:
    """Directory of the persistent cluster started by ``moeplace cluster up`` (``MOEPLACE_CLUSTER_DIR``)."""
    override = os.environ.get("MOEPLACE_CLUSTER_DIR")
    return Path(override) if override else cache_dir() / "cluster"


def state_file() -> Path:
    """The persistent cluster's state: pids, ports, kubeconfig and tokens (owner-only)."""
    return state_dir() / "state.json"


def parse_flag(value: str | None, name: str) -> bool:
    """Read a boolean environment variable; anything but the usual spellings is an error."""
    normalized = (value or "").strip().lower()
    if normalized in ("", "0", "false", "no", "off"):
        return False
    if normalized in ("1", "true", "yes", "on"):
        return True
    raise ClusterError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


def use_existing_kubeconfig_from_env() -> bool:
    """Whether ``MOEPLACE_USE_EXISTING_KUBECONFIG`` asks ``cluster up`` to keep ``$KUBECONFIG``."""
    return parse_flag(os.environ.get(USE_EXISTING_KUBECONFIG_ENV), USE_EXISTING_KUBECONFIG_ENV)


def read_state() -> dict[str, Any] | None:
    """The persistent cluster's state, or None if ``cluster up`` has not run (or ``down`` has)."""
    path = state_file()
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ClusterError(f"{path} is corrupt ({error}); delete it and stop leftover processes") from None


def _state_processes(state: Mapping[str, Any]) -> list[ManagedProcess]:
    processes = [ManagedProcess.from_state(state["prometheus"]["process"])]
    if state.get("control_plane"):
        processes += LocalCluster.from_state(state["control_plane"]).processes
    return processes


def is_up(state: Mapping[str, Any]) -> bool:
    """Whether every process recorded in ``state`` is still running."""
    return all(process.is_running() for process in _state_processes(state))


def _existing_kubeconfig() -> str:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        raise ClusterError("--use-existing-kubeconfig needs $KUBECONFIG to name a kubeconfig file")
    for path in kubeconfig.split(os.pathsep):
        if path and not Path(path).is_file():
            raise ClusterError(f"KUBECONFIG names {path}, which is not a file")
    return kubeconfig


def cluster_up(use_existing_kubeconfig: bool = False) -> tuple[dict[str, Any], bool]:
    """Start the persistent cluster detached unless it is already up; return (state, newly started).

    With ``use_existing_kubeconfig`` no apiserver is started: ``$KUBECONFIG`` is recorded and only
    Prometheus runs locally.
    """
    state = read_state()
    if state is not None:
        if is_up(state):
            return state, False
        # A crash or reboot left a partial cluster: clear it so the fresh one starts from empty dirs.
        cluster_down()
    root = state_dir()
    for stale in ("control-plane", "prometheus"):
        # Logs survive a restart; everything else belonged to the dead cluster.
        stale_dir = root / stale
        if stale_dir.is_dir():
            for child in stale_dir.iterdir():
                if child.name in ("logs", "prometheus.log"):
                    continue
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)

    control_plane: LocalCluster | None = None
    if use_existing_kubeconfig:
        kubeconfig, server = _existing_kubeconfig(), None
    else:
        control_plane = start_control_plane(root / "control-plane", detached=True)
        kubeconfig, server = str(control_plane.kubeconfig), control_plane.server
    try:
        prometheus = start_prometheus(root / "prometheus", detached=True)
    except BaseException:
        if control_plane is not None:
            control_plane.stop()
        raise
    state = {
        "version": 1,
        "use_existing_kubeconfig": use_existing_kubeconfig,
        "kubeconfig": kubeconfig,
        "server": server,
        "control_plane": control_plane.to_state() if control_plane else None,
        "prometheus": prometheus.to_state(),
    }
    _write_private(state_file(), json.dumps(state, indent=2) + "\n")
    return state, True


def cluster_down() -> bool:
    """Stop everything the state file records and remove it; return whether there was a state file."""
    state = read_state()
    if state is None:
        return False
    PrometheusServer.from_state(state["prometheus"]).stop()
    if state.get("control_plane"):
        LocalCluster.from_state(state["control_plane"]).stop()
    state_file().unlink(missing_ok=True)
    return True


def cluster_env_lines(state: Mapping[str, Any]) -> list[str]:
    """Shell ``export`` lines that point kubectl, the operator and the demo at the persistent cluster."""
    return [
        f"export KUBECONFIG={shlex.quote(state['kubeconfig'])}",
        f"export MOEPLACE_PROMETHEUS_URL={shlex.quote(state['prometheus']['url'])}",
        f"export MOEPLACE_PROMETHEUS_TARGETS_FILE={shlex.quote(state['prometheus']['targets_file'])}",
    ]

"""A private, throw-away RabbitMQ node for tests that must stop, restart or crash a broker.

The shared broker (``rabbit@localhost`` on 5672) must never be touched, so tests
that exercise broker outages get their own node instead:

* node name ``sbtest<hex>@localhost``, AMQP on a free loopback port, Erlang
  distribution on another free port (both chosen once and kept across restarts);
* all state (mnesia, logs, pid file, config, empty plugin list) in a temporary
  directory owned by the broker's OS user, so ``stop()``/``start()`` keeps durable
  queues and persistent messages;
* when running as root the node runs as the ``rabbitmq`` user with that user's
  ``HOME``, so it uses the same Erlang cookie as the shared node and the CLI
  tools (run the same way by :meth:`RabbitNode.ctl`) can talk to it;
* the node is started from the real ``rabbitmq-server`` script, not Debian's
  ``/usr/sbin`` wrapper (which would redirect output to the shared node's
  ``/var/log/rabbitmq/startup_log``), in its own process group.

Typical use is through the ``rabbit_node`` fixture in ``tests/conftest.py``::

    def test_outage(rabbit_node):
        publish(rabbit_node.url)
        rabbit_node.stop()      # graceful, port closed afterwards
        rabbit_node.start()     # same node, same data
        rabbit_node.kill()      # SIGKILL of the Erlang VM
        rabbit_node.start()

Crash caveat (RabbitMQ 3.10, seen here): a quorum queue's Ra member is recorded in
a DETS table (``ra_directory_reverse``) that reaches the disk only after 500 ms
without further writes. If the node is killed within that window after the queue
was *declared*, it restarts with a brand-new, empty, leaderless member for the
queue: every operation on it times out (after 60 s) and its messages are lost.
Tests that ``kill()`` should call :meth:`RabbitNode.sync_registries` after declaring
quorum queues, as a real broker has long written them when it crashes (messages
published later are not affected: they are in the fsynced Ra WAL once confirmed).
``stop()`` is not affected.

Set ``SYNCBUS_TEST_RABBITMQ_SBIN`` to the directory holding ``rabbitmq-server``
and ``rabbitmqctl`` if they are not in one of the usual places.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psutil

from tests.support import pick_free_port, port_is_open, wait_for, wait_for_port

__all__ = [
    "RabbitNode",
    "RabbitNodeError",
    "find_rabbitmq_sbin",
    "sweep_stale_dirs",
]

_HOST = "127.0.0.1"
_BROKER_USER = "rabbitmq"
#: Ports the shared node and the RabbitMQ CLI tools use; never hand them out.
_RESERVED_PORTS = frozenset({4369, 5672, 25672, *range(35672, 35683)})
_WRAPPER_NAME = "rabbitmq-script-wrapper"
_DIR_PREFIX = "sbtest-rabbit-"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """``preexec_fn``: SIGTERM the child when the test process dies (even by SIGKILL).

    ``rabbitmq-server`` traps SIGTERM and shuts the node down, so a killed pytest
    run leaves no broker behind (its directory is swept later, see
    :func:`sweep_stale_dirs`).
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def sweep_stale_dirs(max_age: float = 3600.0) -> None:
    """Remove node directories of earlier runs that died without cleaning up.

    Only directories untouched for ``max_age`` seconds whose node is not running
    are removed, so concurrent test runs are never disturbed.
    """
    now = time.time()
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            if not path.is_dir() or now - path.stat().st_mtime < max_age:
                continue
            pid_text = (path / "node.pid").read_text().strip() if (path / "node.pid").exists() else ""
            if pid_text.isdigit() and psutil.pid_exists(int(pid_text)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


class RabbitNodeError(RuntimeError):
    """The private node could not be started, stopped or reached."""


def find_rabbitmq_sbin() -> Path | None:
    """Return the directory with the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts.

    Looks at ``$SYNCBUS_TEST_RABBITMQ_SBIN``, Debian/RPM's ``/usr/lib/rabbitmq/bin``
    and whatever ``rabbitmq-server`` is on ``PATH``; distribution wrappers that
    re-exec through ``su`` or redirect output are skipped by resolving symlinks.
    """
    candidates: list[Path] = []
    env_dir = os.environ.get("SYNCBUS_TEST_RABBITMQ_SBIN")
    if env_dir:
        candidates.append(Path(env_dir))
    candidates.append(Path("/usr/lib/rabbitmq/bin"))
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        server = directory / "rabbitmq-server"
        if not server.exists():
            continue
        real = server.resolve()
        if real.name == _WRAPPER_NAME:
            continue
        if (real.parent / "rabbitmqctl").exists():
            return real.parent
    return None


class RabbitNode:
    """One private RabbitMQ node; see the module docstring.

    Attributes:
        nodename: Erlang node name, ``sbtest<hex>@localhost``.
        amqp_port: AMQP listener port on 127.0.0.1 (stable across restarts).
        dist_port: Erlang distribution port (stable across restarts).
        base_dir: temporary directory holding all of the node's files.
        log_file: the node's main log file (useful when a test fails).
        last_start_seconds: wall time the most recent :meth:`start` took.
    """

    def __init__(self, base_dir: Path | None = None, *, start_timeout: float = 90.0) -> None:
        sbin = find_rabbitmq_sbin()
        if sbin is None:
            raise RabbitNodeError(
                "RabbitMQ server scripts not found: install the rabbitmq-server package "
                "or set SYNCBUS_TEST_RABBITMQ_SBIN to the directory holding rabbitmq-server "
                "and rabbitmqctl"
            )
        self._sbin = sbin
        self._as_user = self._pick_user()
        self.start_timeout = start_timeout
        suffix = secrets.token_hex(4)
        self.nodename = f"sbtest{suffix}@localhost"
        self.amqp_port = pick_free_port(_HOST, avoid=_RESERVED_PORTS)
        self.dist_port = pick_free_port(_HOST, avoid=_RESERVED_PORTS | {self.amqp_port})
        self._owns_base_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{suffix}-"))
            if base_dir is None
            else base_dir
        )
        self.log_file = self.base_dir / "log" / f"{self.nodename}.log"
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._beam: psutil.Process | None = None
        self._write_files()

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _pick_user() -> pwd.struct_passwd | None:
        """The OS user to run as: ``rabbitmq`` when we are root, else ourselves (None)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(_BROKER_USER)
        except KeyError:
            raise RabbitNodeError(
                f"running as root but there is no {_BROKER_USER!r} OS user to run the node as"
            ) from None

    def _write_files(self) -> None:
        base = self.base_dir
        (base / "log").mkdir(parents=True, exist_ok=True)
        (base / "mnesia").mkdir(exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {_HOST}:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.file.level = info\n"
            "log.console = false\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        # Our own (empty) env file, so /etc/rabbitmq/rabbitmq-env.conf (NODENAME=...) is ignored.
        (base / "rabbitmq-env.conf").write_text("")
        if self._as_user is not None:
            uid, gid = self._as_user.pw_uid, self._as_user.pw_gid
            for path in [base, *base.rglob("*")]:
                os.chown(path, uid, gid)
        base.chmod(0o750)

    def _env(self) -> dict[str, str]:
        """A minimal, fully explicit environment for the server and the CLI tools."""
        base = self.base_dir
        home = self._as_user.pw_dir if self._as_user else os.environ.get("HOME", str(base))
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
            "HOME": home,  # the Erlang cookie lives in $HOME/.erlang.cookie
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": _HOST,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        if self._as_user is not None:
            env["USER"] = env["LOGNAME"] = self._as_user.pw_name
        return env

    def _as_broker_user(self, argv: list[str]) -> list[str]:
        """Prefix ``argv`` so it runs as the broker's OS user (no-op if not root)."""
        if self._as_user is None:
            return argv
        if shutil.which("setpriv"):
            # Changing uid clears the parent-death signal, so setpriv sets it again.
            return ["setpriv", "--reuid", self._as_user.pw_name, "--regid",
                    str(self._as_user.pw_gid), "--init-groups", "--pdeathsig", "TERM",
                    "--", *argv]
        return ["runuser", "-u", self._as_user.pw_name, "--", *argv]

    # ------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """AMQP URL for the default vhost, as guest/guest (allowed from loopback only)."""
        return f"amqp://guest:guest@{_HOST}:{self.amqp_port}/%2F"

    @property
    def is_running(self) -> bool:
        """True while the node's OS process (the Erlang VM) is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def beam_pid(self) -> int | None:
        """PID of the node's Erlang VM (``beam.smp``), if it is running."""
        return self._beam.pid if self.is_running and self._beam is not None else None

    # ---------------------------------------------------------------- control

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <this node> ARGS...`` and return the completed process.

        Raises:
            RabbitNodeError: ``check`` is true and the command failed.
        """
        argv = self._as_broker_user([str(self._sbin / "rabbitmqctl"), "-n", self.nodename, *args])
        proc = subprocess.run(
            argv, env=self._env(), cwd=self.base_dir, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def sync_registries(self) -> None:
        """Write the node's DETS tables to disk now, the quorum queues' Ra registry
        among them (see the crash caveat in the module docstring): a ``kill()`` after
        it keeps every quorum queue declared so far.

        Raises:
            RabbitNodeError: the node did not answer, or a table could not be written.
        """
        self.ctl("eval", "[ok = dets:sync(Table) || Table <- dets:all()], ok.")

    def start(self, timeout: float | None = None) -> float:
        """Start the node and wait until it is fully booted; return the seconds it took.

        Ready means: the AMQP port accepts TCP connections *and*
        ``rabbitmqctl await_startup`` succeeded. The same node name, ports and
        data directory are reused on every call.
        """
        if self.is_running:
            raise RabbitNodeError(f"{self.nodename} is already running")
        timeout = self.start_timeout if timeout is None else timeout
        for port in (self.amqp_port, self.dist_port):
            if port_is_open(_HOST, port, timeout=0.2):
                raise RabbitNodeError(f"port {port} for {self.nodename} is taken by another process")
        started = time.monotonic()
        deadline = started + timeout
        with open(self.base_dir / "server-output.log", "ab") as out:
            out.write(f"\n==== start at {time.strftime('%H:%M:%S')} ====\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                self._as_broker_user([str(self._sbin / "rabbitmq-server")]),
                env=self._env(), cwd=self.base_dir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._beam = wait_for(
                self._find_beam, timeout=max(deadline - time.monotonic(), 1.0), interval=0.05,
                message=f"the Erlang VM of {self.nodename} to appear",
            )
            wait_for(
                self._amqp_port_accepts, timeout=max(deadline - time.monotonic(), 1.0),
                interval=0.05, message=f"{self.nodename} to listen on AMQP port {self.amqp_port}",
            )
            remaining = max(int(deadline - time.monotonic()), 5)
            self.ctl("await_startup", "--timeout", str(remaining), timeout=remaining + 15)
        except Exception as exc:
            self.kill()
            raise RabbitNodeError(
                f"{self.nodename} failed to start: {exc}\n--- log tail ---\n{self.log_tail()}"
            ) from exc
        self.last_start_seconds = time.monotonic() - started
        return self.last_start_seconds

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node gracefully (SIGTERM to the VM, which RabbitMQ handles as a
        clean shutdown) and wait until the process is gone and the AMQP port closed."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._reap()
            return
        if self._beam is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._beam.terminate()  # checks PID reuse before signalling
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RabbitNodeError(
                f"{self.nodename} did not stop within {timeout}s and was killed"
            ) from None
        self._reap()
        wait_for_port(_HOST, self.amqp_port, timeout=10, closed=True)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash: no clean shutdown) and wait for it to die."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._beam is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self._beam.kill()  # checks PID reuse before signalling
            # Everything else the node started is in its own process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        self._reap()
        # A killed VM sheds its memory before its sockets: wait until both ports are
        # free, or start() would take them for another process's.
        for port in (self.amqp_port, self.dist_port):
            with contextlib.suppress(Exception):
                wait_for_port(_HOST, port, timeout=30, closed=True)

    def cleanup(self) -> None:
        """Kill the node (if running) and delete its directory; safe to call twice."""
        self.kill()
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the node log and of the server's own output."""
        chunks = []
        for path in (self.log_file, self.base_dir / "server-output.log"):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            chunks.append(f"[{path.name}]\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log)"

    # -------------------------------------------------------------- internals

    def _find_beam(self) -> psutil.Process | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is not None:
            raise RabbitNodeError(
                f"rabbitmq-server exited early with code {proc.returncode}:\n{self.log_tail()}"
            )
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.name().startswith("beam"):
                    return child
        return None

    def _amqp_port_accepts(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RabbitNodeError(
                f"{self.nodename} exited during boot with code {self._proc.returncode}"
            )
        return port_is_open(_HOST, self.amqp_port, timeout=0.5)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
            self._beam = None

    # -------------------------------------------------------- context manager

    def __enter__(self) -> RabbitNode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RabbitNode {self.nodename} amqp={self.amqp_port} {state}>"

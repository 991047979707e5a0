"""Start, stop and restart a broker with the project's own configuration.

:class:`MosquittoBroker` runs the ``mosquitto`` binary on a config rendered from a file in
this folder (listener port, persistence and password/ACL paths rewritten for the run).
:class:`EmbeddedBroker` runs amqtt in a background thread for machines without Mosquitto.
Both wait on readiness (the port accepts connections), never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fedmq.broker")
BROKER_DIR = Path(__file__).resolve().parent
DEV_CONF = BROKER_DIR / "mosquitto.dev.conf"
DEPLOY_CONF = BROKER_DIR / "mosquitto.conf"


class BrokerError(RuntimeError):
    """The broker could not be started (names the binary, config and log)."""


class PortInUse(BrokerError):
    """A listener's port is taken by another process: no broker (embedded or not) can use it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether another process listens on ``host:port`` (a bind there fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_listening(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Block until ``host:port`` accepts TCP connections; ``alive()`` False aborts early."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if alive is not None and not alive():
            raise BrokerError(f"broker exited before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker not listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def mqtt_answers(host: str, port: int, timeout: float) -> bool:
    """Whether an MQTT 3.1.1 CONNECT to ``host:port`` gets a CONNACK within ``timeout`` seconds.

    Any CONNACK counts, a refusal too: the broker's MQTT side is up. A listening socket is not
    enough for NATS, whose MQTT side answers only once JetStream holds the account's MQTT
    streams (seconds after the port opens, on a busy machine).
    """
    client_id = b"fedmq-ready"
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol name, level 4, clean session, keep-alive 60 s
    body = variable + len(client_id).to_bytes(2, "big") + client_id
    connect = bytes([0x10, len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(connect)
            head = sock.recv(4)
            if len(head) >= 1 and head[0] == 0x20:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")  # DISCONNECT
                return True
            return False
    except OSError:  # refused, reset, or no answer in time
        return False


def wait_mqtt(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Block until ``host:port`` answers an MQTT CONNECT (:func:`mqtt_answers`); ``alive()`` False aborts."""
    deadline = time.monotonic() + timeout
    while not mqtt_answers(host, port, max(0.5, min(10.0, deadline - time.monotonic()))):
        if alive is not None and not alive():
            raise BrokerError(f"broker exited before answering MQTT on {host}:{port}")
        if time.monotonic() > deadline:
            raise BrokerError(f"broker does not answer MQTT on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.1)  # between attempts at a process's readiness: no event to wait on


def spawn(binary: str, conf: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``binary -c conf`` in a session of its own, its output appended to ``log_path``."""
    out = open(log_path, "ab")  # noqa: SIM115 - the child keeps it open
    try:
        return subprocess.Popen(
            [binary, "-c", str(conf)], stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        out.close()


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a broker's log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL (a broker saves its state on SIGTERM)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def render_mosquitto_conf(
    template: Path, *, port: int, bind: str | None, data_dir: Path, config_dir: Path = BROKER_DIR
) -> str:
    """Return ``template`` with its first listener, persistence and auth paths set for this run.

    ``/mosquitto/config/NAME`` (the container path used by compose) maps to ``config_dir/NAME``
    (``passwd`` falls back to ``passwd.compose``); ``/mosquitto/data/`` maps to ``data_dir``.
    """
    out: list[str] = []
    listener_done = False
    for line in template.read_text().splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener" and not listener_done:
            line = f"listener {port}" + (f" {bind}" if bind else "")
            listener_done = True
        elif key == "persistence_location":
            line = f"persistence_location {data_dir}/"
        elif key in ("password_file", "acl_file") and len(words) == 2:
            name = Path(words[1]).name
            path = config_dir / name
            if not path.exists() and name == "passwd":
                path = config_dir / "passwd.compose"
            line = f"{key} {path}"
        out.append(line)
    if not listener_done:
        raise BrokerError(f"{template} has no listener line")
    return "\n".join(out) + "\n"


class MosquittoBroker:
    """A Mosquitto process on a config from ``broker/``; restartable on the same port and data."""

    kind = "mosquitto"

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        conf: Path = DEV_CONF,
        workdir: Path | None = None,
        binary: str | None = None,
        bind: str | None = None,
        render: bool = True,
    ) -> None:
        """Prepare (not start) a broker.

        ``render=False`` runs ``conf`` exactly as written (e.g. one from ``fedmq broker init``);
        ``port`` must then be the port of its first listener, used to wait for readiness.
        """
        found = (
            binary
            or shutil.which("mosquitto")
            or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        )
        if found is None:
            raise BrokerError("no mosquitto binary on PATH (apt-get install mosquitto, or use the embedded broker)")
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.bind = bind if bind is not None else host
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if render:
            self.conf_path = self.workdir / "mosquitto.conf"
            self.conf_path.write_text(
                render_mosquitto_conf(conf, port=self.port, bind=self.bind, data_dir=self.workdir / "data")
            )
        else:
            if port is None:
                raise BrokerError(f"running {conf} as written needs the port of its first listener")
            self.conf_path = Path(conf)
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the process and wait until it listens."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        for address, port in self.listeners():
            if port_in_use(address, port):
                # Readiness below only sees that something listens: another process's listener would
                # pass it while our Mosquitto exits with "Address already in use" (on any of its listeners).
                raise PortInUse(
                    f"port {port} on {address} is in use by another process: stop it or choose another "
                    f"{'--port' if port == self.port else 'port in ' + str(self.conf_path)}"
                )
        self.proc = spawn(self.binary, self.conf_path, self.log_path)
        atexit.register(self.stop)  # an exiting parent never leaves its broker behind
        proc = self.proc
        try:
            wait_listening(self.host, self.port, timeout, alive=lambda: proc.poll() is None)
        except BrokerError as exc:
            self.stop()
            raise BrokerError(f"{exc}; config {self.conf_path}; log:\n{self.log_tail()}") from None
        return self

    def listeners(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` of every listener in the config (address ``0.0.0.0`` when unbound)."""
        out = []
        for line in self.conf_path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "listener" and words[1].isdigit():
                out.append((words[2] if len(words) > 2 else "0.0.0.0", int(words[1])))
        return out

    def log_tail(self, lines: int = 20) -> str:
        """The end of Mosquitto's log."""
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed (Mosquitto saves persistence on SIGTERM)."""
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        terminate(proc, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, for fault-injection tests."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password file, ACL file and TLS material."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("broker is not running")
        self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        """Stop and start again on the same port and data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove a work folder this object created."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class EmbeddedBroker:
    """amqtt (pure Python, MQTT 3.1.1) in a background thread with its own event loop.

    For demos and development on machines without Mosquitto; anonymous, loopback only,
    no persistence. It is slower than Mosquitto and not meant for deployment.
    """

    kind = "embedded"

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start amqtt and wait until it listens."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_broker())
            except BaseException as exc:  # surfaced to the caller below
                self._error = exc
                ready.set()
                return
            ready.set()
            loop.run_forever()
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._broker.shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fedmq-embedded-broker", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if self._error is not None:
            raise BrokerError(f"embedded broker failed to start on {self.host}:{self.port}: {self._error}")
        if not ready.is_set():
            raise BrokerError(f"embedded broker not started after {timeout:.0f} s")
        return self  # Broker.start() returns once its listener is bound: that is the readiness signal.

    async def _start_broker(self) -> None:
        import logging

        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await self._broker.start()

    def stop(self) -> None:
        """Shut the broker down and join its thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None

    def cleanup(self) -> None:
        """Same as :meth:`stop`."""
        self.stop()


def start_broker(
    kind: str = "auto", *, port: int | None = None, host: str = "127.0.0.1", conf: Path = DEV_CONF
) -> MosquittoBroker | EmbeddedBroker:
    """Start Mosquitto (``kind="mosquitto"``), amqtt (``"embedded"``) or whichever works (``"auto"``).

    ``auto`` prefers Mosquitto and falls back to the embedded broker, with a warning, when the
    binary is missing or fails to start (the embedded broker ignores ``conf``).
    """
    if kind not in ("auto", "mosquitto", "embedded"):
        raise ValueError(f"broker kind must be auto, mosquitto or embedded, got {kind!r}")
    if kind == "mosquitto":
        return MosquittoBroker(port=port, host=host, conf=conf).start()
    if kind == "auto" and (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        try:
            return MosquittoBroker(port=port, host=host, conf=conf).start()
        except PortInUse:
            raise
        except BrokerError as exc:
            log.warning("mosquitto did not start (%s); using the embedded broker instead", str(exc).splitlines()[0])
    return EmbeddedBroker(port=port, host=host).start()

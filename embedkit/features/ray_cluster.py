"""Ray for embedkit: import it on demand, connect to a cluster, or run a private local one.

A private local Ray (no address) is bound to 127.0.0.1 (Ray's single-machine mode), with the
dashboard and usage reporting off, and is shut down when the block ends, also on Ctrl-C; a
watchdog process kills what Ray would leave behind if the driver is killed with SIGKILL.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import MissingDependencyError, RayClusterError
from ..runtimes.cpu import cpu_count

LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's "single machine" mode: the node address is 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",  # no network at run time
}


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("ray", "ray", "the Ray engine and EmbedBatch") from exc
    return ray


def _split(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` address, None for ``auto``/``local``/``ray://...``.

    Raises:
        RayClusterError: not a string, empty, or not ``HOST:PORT`` with a port in 1..65535.
    """
    if not isinstance(address, str) or not address.strip():
        raise RayClusterError(address, "an empty address; leave the address out for a private local Ray, "
                                       "or give HOST:PORT")
    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or host != host.strip() or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(address, "expected HOST:PORT (a port in 1..65535)")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail fast (a few seconds, not Ray's long reconnect loop) when ``host:port`` does not answer."""
    split = _split(address)
    if split is None:
        return
    host, port = split
    try:
        socket.create_connection((host.strip("[]"), port), timeout=5).close()
    except OSError as exc:
        raise RayClusterError(address, f"{type(exc).__name__}: {exc}") from None


@contextmanager
def local_cluster(cpus: float | None = None, address: str | None = None) -> Iterator[bool]:
    """Connect to ``address``, or start a private local Ray, for the duration of the block.

    No ``address`` but ``RAY_ADDRESS`` set in the environment: that cluster (as ``ray.init`` does).
    Local: bound to 127.0.0.1, ``cpus`` CPUs (default: this machine's), dashboard and usage stats
    off, workers importing what this process imports (its ``sys.path``); shut down on exit, also
    on an exception or Ctrl-C. An already initialised Ray is used as it is and left running.
    Yields True when this block started (and will stop) Ray.

    Raises:
        RayClusterError: ``address`` does not answer, or Ray refused to start or connect.
        MissingDependencyError: ray is not installed (``pip install 'embedkit[ray]'``).
    """
    ray = _ray()
    if address is not None:
        _split(address)  # a malformed address is refused, never read as "no address"
    if ray.is_initialized():
        connected = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", connected):
            raise RayClusterError(address, f"this process is connected to the Ray at {connected} already; "
                                           "call ray.shutdown() first, or leave the address out to use that one")
        yield False
        return
    watchdog = None
    if address == "local":  # Ray's "start a new local one": this module's private one, bound to loopback
        address = None
    elif address is None and os.environ.get("RAY_ADDRESS", "").strip():
        address = os.environ["RAY_ADDRESS"]  # Ray's own convention (ray.init reads it too): that cluster, no private one
    if address is not None:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except BaseException as exc:  # Ray raises ConnectionError, RuntimeError, ValueError here
            _abandon(ray, None)
            if not isinstance(exc, Exception):  # Ctrl-C: re-raised as it is
                raise
            raise RayClusterError(address, f"{type(exc).__name__}: {exc}") from exc
    else:
        os.environ.update(LOCAL_ENV)  # inherited by the raylet, the GCS and every worker
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported before the variable was set
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env = {k: v for k, v in {"PYTHONPATH": path, "EMBEDKIT_HOME": os.environ.get("EMBEDKIT_HOME")}.items() if v}
        watchdog = None
        try:
            watchdog = _watchdog()
            ray.init(num_cpus=int(cpus or cpu_count()), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env={"env_vars": env})
        except BaseException as exc:  # also Ctrl-C while Ray starts: nothing half started is left
            _abandon(ray, watchdog)
            if not isinstance(exc, Exception):
                raise
            raise RayClusterError(None, f"{type(exc).__name__}: {exc}") from exc
    try:
        yield True
    finally:
        try:
            ray.shutdown()
        finally:
            _release(watchdog)


# Ray fate-shares its raylet and GCS with the driver, but its per-node agents poll for their
# parent and can outlive a driver killed with SIGKILL. This watchdog (its own session, so Ctrl-C
# in the terminal does not reach it) records the driver's Ray descendants twice a second (new since
# it started, and Ray's by their command line: the caller's own children are never touched); when
# the driver is gone (its pipe closes, however it ended) it kills those still alive.
_WATCH = r"""
import os, select, signal, sys
driver, me = int(sys.argv[1]), os.getpid()
def family():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append((int(name), fields[19]))
    out, todo = {}, [driver]
    while todo:
        for pid, start in kids.get(todo.pop(), []):
            if pid != me:
                out[pid] = start
                todo.append(pid)
    return out
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
def is_ray(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    first = os.path.basename(cmd.split(b"\0", 1)[0])
    return cmd.startswith(b"ray::") or b"/ray/" in cmd or first in (b"raylet", b"gcs_server")
before = family()  # the driver's own children (not Ray's): never touched
os.write(1, b"r")  # the driver starts Ray only after this
seen = {}
def look():
    seen.update((pid, start) for pid, start in family().items()
                if pid not in seen and before.get(pid) != start and is_ray(pid))
while True:
    ready, _, _ = select.select([0], [], [], 0.5)
    if ready and not os.read(0, 1):
        break
    look()
look()  # what started since the last look (a start-up cut short) and is still the driver's
for pid, start in seen.items():
    if started(pid) == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _watchdog() -> Any:
    import subprocess

    if not os.path.isdir("/proc"):
        return None
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCH, str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
    watchdog.stdout.read(1)  # it has recorded the driver's own children: what comes next is Ray's
    return watchdog


def _abandon(ray: Any, watchdog: Any) -> None:
    """Undo a ``ray.init`` that failed or was interrupted: what it started is stopped, the watchdog released."""
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - the start-up's own error is the one to report
        import logging

        logging.getLogger(__name__).warning("ray.shutdown after a failed start: %s: %s", type(exc).__name__, exc)
    finally:
        _release(watchdog)


def _release(watchdog: Any) -> None:
    """Close the watchdog's pipe: it kills what of this Ray is still alive, then exits."""
    if watchdog is None:
        return
    watchdog.stdin.close()
    try:
        watchdog.wait(timeout=30)
    except Exception:  # noqa: BLE001 - never leave it behind
        watchdog.kill()
    finally:
        watchdog.stdout.close()

"""The local stack: `make run` (python -m services.stack).

Starts Redis (embedded unless REDIS_URL is set), the gRPC services (inference, analytics,
experiments, active learning, training), the gateway and the console as child processes,
registers the demo tenants and their adapters through the gateway's admin API, and stops
everything on Ctrl-C. A child that dies once the stack is up is restarted, with backoff,
while the others keep serving. The keys are written to .run/keys.env (mode 0600) and
printed only to a terminal, never into a log.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.localhost import free_port
from services.common.redis import EmbeddedRedis
from services.common.settings import REPO_ROOT

log = logging.getLogger("loraplex.stack")

DEMO_ADAPTERS = REPO_ROOT / "models" / "adapters"
DEMO_TENANTS = ("retailer", "bank", "airline")
# gRPC services the stack runs (python -m services.<name>) and their default ports.
GRPC_SERVICES = {
    "inference": 50051,
    "analytics": 50052,
    "experiments": 50053,
    "activelearning": 50054,
    "training": 50055,
}


def demo_adapter_name(tenant: str) -> str:
    return f"{tenant}-support"


def read_keys(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.removeprefix("export ").strip(): v.strip() for k, v in pairs}


def write_keys(path: Path, keys: dict[str, str]) -> None:
    """Only the owner may read the keys, even if the file existed with other permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write("".join(f"export {k}={v}\n" for k, v in keys.items()))


def grpc_serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ready(url: str, path: str = "/readyz") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Child:
    """One supervised process: restarted when it dies, after a backoff that doubles with
    each quick death (a crash loop does not spin) and resets once it has run a while."""

    FIRST_BACKOFF = 1.0
    MAX_BACKOFF = 30.0
    HEALTHY_AFTER = 60.0  # seconds of running that reset the backoff

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name, self.command, self.env = name, command, env
        self.restarts = 0
        self._backoff = self.FIRST_BACKOFF
        self._restart_at: float | None = None
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        self.started_at = time.monotonic()
        return subprocess.Popen(self.command, env=self.env)

    def check_started(self) -> None:
        """While the stack starts, a child that dies is a configuration error: stop."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.process.returncode}")

    def supervise(self) -> None:
        """Once the stack is up: restart the child if it died, when its backoff is over."""
        if self.process.poll() is None:
            if time.monotonic() - self.started_at > self.HEALTHY_AFTER:
                self._backoff = self.FIRST_BACKOFF
            return
        now = time.monotonic()
        if self._restart_at is None:
            self._restart_at = now + self._backoff
            log.warning(
                "%s exited with status %s; restarting in %.0f s",
                self.name,
                self.process.returncode,
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)
        if now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.process = self._spawn()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_until(ready: Callable[[], bool], what: str, deadline: float, children) -> None:
    while not ready():
        for child in children:
            child.check_started()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready")
        time.sleep(0.2)


def list_models(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def seed_demo(url: str, admin_key: str, known: dict[str, str]) -> dict[str, str]:
    """Create the demo tenants, their keys and adapters (idempotent); return tenant keys."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    keys: dict[str, str] = {}
    for tenant in DEMO_TENANTS:
        reply = admin.post("/admin/tenants", json={"tenant": tenant})
        if reply.status_code not in (201, 409):
            reply.raise_for_status()
        env_name = f"{tenant.upper()}_KEY"
        key = known.get(env_name, "")
        if not key or list_models(url, key).status_code != 200:  # keep a key that still works
            created = admin.post(f"/admin/tenants/{tenant}/keys")
            created.raise_for_status()
            key = created.json()["api_key"]
        models = list_models(url, key)
        models.raise_for_status()
        keys[env_name] = key
        name = demo_adapter_name(tenant)
        if name not in [m["id"] for m in models.json()["data"]]:
            directory = DEMO_ADAPTERS / tenant
            files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
            admin.post(
                f"/admin/tenants/{tenant}/adapters", data={"name": name}, files=files
            ).raise_for_status()
    return keys


@dataclass
class LocalStack:
    """A stack started by start_on_free_ports() (tests and benchmarks)."""

    url: str
    keys: dict[str, str]
    admin_key: str
    process: subprocess.Popen
    run_dir: Path
    console_url: str = ""
    # gRPC service name -> host:port, for tests that call a service directly
    addrs: dict[str, str] = field(default_factory=dict)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)


def start_on_free_ports(
    run_dir: Path,
    redis_url: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    services: Sequence[str] = (),
) -> LocalStack:
    """`python -m services.stack` with its services (all, or `services`) on free ports, demo
    tenants seeded; returns once the keys are written. Output goes to run_dir/stack.log."""
    admin_key = "lpx_admin_" + secrets.token_urlsafe(12)
    gateway_port, console_port = free_port(), free_port()
    addrs = {name: f"127.0.0.1:{free_port()}" for name in GRPC_SERVICES}
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "LORAPLEX_RUN_DIR": str(run_dir),
        **{f"{name.upper()}_ADDR": addr for name, addr in addrs.items()},
        "GATEWAY_PORT": str(gateway_port),
        "CONSOLE_PORT": str(console_port),
        "METRICS_PORT": "0",
        "LORAPLEX_ADMIN_KEY": admin_key,
        **(env or {}),
    }
    log_file = os.fdopen(
        os.open(run_dir / "stack.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w"
    )
    command = [sys.executable, "-m", "services.stack"]
    if services:
        command += ["--services", ",".join(services)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=log_file)
    keys_file = run_dir / "keys.env"
    deadline = time.monotonic() + timeout
    while "AIRLINE_KEY" not in read_keys(keys_file):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (run_dir / "stack.log").read_text()[-5000:]
            raise RuntimeError(f"the stack did not start:\n{tail}")
        time.sleep(0.3)
    url = f"http://127.0.0.1:{gateway_port}"
    console_url = f"http://127.0.0.1:{console_port}"
    addrs = {name: env[f"{name.upper()}_ADDR"] for name in GRPC_SERVICES}  # `env` may override
    return LocalStack(url, read_keys(keys_file), admin_key, process, run_dir, console_url, addrs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true", help="do not register demo tenants")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument(
        "--services",
        default=",".join(GRPC_SERVICES),
        help="the gRPC services to start, comma-separated (inference is required; the "
        "gateway answers 503 for the capabilities of those left out)",
    )
    parser.add_argument(
        "--inference-replicas",
        type=int,
        default=os.environ.get("INFERENCE_REPLICAS", "1"),
        help="how many inference processes to start (env INFERENCE_REPLICAS); the gateway "
        "routes each request to one of them by adapter affinity",
    )
    args = parser.parse_args()
    services = [name for name in args.services.split(",") if name]
    unknown = sorted(set(services) - set(GRPC_SERVICES))
    if unknown or "inference" not in services:
        parser.error(f"--services takes inference plus any of {', '.join(GRPC_SERVICES)}")
    if args.inference_replicas < 1:
        parser.error("--inference-replicas (INFERENCE_REPLICAS) must be 1 or more")

    # Local state (embedded Redis data, adapter store, keys); LORAPLEX_RUN_DIR moves it.
    run_dir = Path(os.environ.get("LORAPLEX_RUN_DIR", REPO_ROOT / ".run"))
    keys_file = run_dir / "keys.env"
    known = read_keys(keys_file)
    admin_key = os.environ.get("LORAPLEX_ADMIN_KEY") or known.get("LORAPLEX_ADMIN_KEY")
    admin_key = admin_key or "lpx_admin_" + secrets.token_urlsafe(24)
    embedded = None if os.environ.get("REDIS_URL") else EmbeddedRedis(run_dir / "redis")
    env = {
        **os.environ,
        "REDIS_URL": os.environ.get("REDIS_URL") or embedded.url,
        "LORAPLEX_ADMIN_KEY": admin_key,
        "ADAPTER_STORE_DIR": os.environ.get("ADAPTER_STORE_DIR", str(run_dir / "adapter-store")),
        "TRAINING_DIR": os.environ.get("TRAINING_DIR", str(run_dir / "training")),
    }
    # Each gRPC service listens where <NAME>_ADDR says; the gateway reads the same names (and
    # treats a service without an address as not deployed).
    for name, port in GRPC_SERVICES.items():
        variable = f"{name.upper()}_ADDR"
        if name in services:
            env[variable] = os.environ.get(variable, f"127.0.0.1:{port}")
        else:
            env.pop(variable, None)
    gateway_port = int(os.environ.get("GATEWAY_PORT", "8080"))
    url = f"http://127.0.0.1:{gateway_port}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    children = [
        Child(
            name,
            [sys.executable, "-m", f"services.{name}"],
            {**env, "PORT": env[f"{name.upper()}_ADDR"].rsplit(":", 1)[1]},
        )
        for name in services
    ]
    # More inference replicas (INFERENCE_REPLICAS=N), each on a free port of its own; the
    # gateway routes across all of them, the other services use the first.
    replicas = [env["INFERENCE_ADDR"]]
    for number in range(2, args.inference_replicas + 1):
        port, metrics_port = free_port(), free_port()
        replicas.append(f"127.0.0.1:{port}")
        command = [sys.executable, "-m", "services.inference"]
        replica_env = {**env, "PORT": str(port), "METRICS_PORT": str(metrics_port)}
        children.append(Child(f"inference-{number}", command, replica_env))
    gateway_env = {**env, "PORT": str(gateway_port)}
    if len(replicas) > 1:
        gateway_env["INFERENCE_ADDRESSES"] = ",".join(replicas)
    children.append(Child("gateway", [sys.executable, "-m", "gateway"], gateway_env))
    # The console is a client of the gateway's HTTP API and nothing else.
    console_port = int(os.environ.get("CONSOLE_PORT", "8501"))
    console_url = f"http://127.0.0.1:{console_port}"
    console_env = {**env, "LORAPLEX_URL": url, "CONSOLE_PORT": str(console_port)}
    children.append(Child("console", [sys.executable, "-m", "console"], console_env))
    stop_requested = False

    def request_stop(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        deadline = time.monotonic() + args.ready_timeout
        grpc_addrs = [*replicas, *(env[f"{name.upper()}_ADDR"] for name in services)]
        for addr in dict.fromkeys(grpc_addrs):
            wait_until(lambda a=addr: grpc_serving(a), f"service at {addr}", deadline, children)
        wait_until(lambda: http_ready(url), f"gateway at {url}", deadline, children)
        wait_until(
            lambda: http_ready(console_url, "/_stcore/health"),
            f"console at {console_url}",
            deadline,
            children,
        )
        keys = {} if args.no_demo else seed_demo(url, admin_key, known)
        write_keys(keys_file, {"LORAPLEX_URL": url, "LORAPLEX_ADMIN_KEY": admin_key, **keys})
        print(f"\nloraplex is running at {url}  (Ctrl-C stops it)", flush=True)
        print(f"  console        {console_url}  (sign in with a key below)")
        # Keys go to a terminal only: stdout redirected to a file would be a log of secrets.
        show = sys.stdout.isatty()
        print(f"  admin key      {admin_key if show else '(in the keys file)'}")
        for tenant in () if args.no_demo else DEMO_TENANTS:
            key = keys[tenant.upper() + "_KEY"] if show else "(in the keys file)"
            print(f"  {tenant:<14} key {key}  adapter {demo_adapter_name(tenant)}")
        print(f"  keys saved to  {keys_file}  (mode 0600; source it)\n", flush=True)
        while not stop_requested:
            for child in children:
                child.supervise()
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError, httpx.HTTPError) as err:
        print(f"loraplex stack failed: {err}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            child.stop()
        for child in children:
            child.wait()
        if embedded:
            embedded.close()


if __name__ == "__main__":
    sys.exit(main())

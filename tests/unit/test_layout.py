"""The house's layout holds: the kinds are listed once (config/kinds) and everything per kind
follows from that list; each kind has its folder under config and workers; the demo and the
sandboxes stay out of the production import graph; no production module outgrows ~400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from config.destinations import Destinations
from config.keys import queue_for, task_name_for
from config.kinds import KINDS
from config.settings import Settings
from tests.helpers import ROOT
from workers import kinds as worker_kinds
from workers.app import PostbackRelay, create_app
from workers.cli import main as cli_main

PRODUCTION = ("workers", "producers", "schemas", "config")
MAX_LINES = 400
# Known offenders, each to be split by the change named; remove the line once it lands.
TOO_LONG_FOR_NOW: set[str] = set()


def _is_dev_only(path: Path) -> bool:
    relative = path.relative_to(ROOT)
    return relative.parts[:2] == ("workers", "dev") or path.name == "sandbox.py"


def production_modules() -> list[Path]:
    return sorted(
        path
        for package in PRODUCTION
        for path in (ROOT / package).rglob("*.py")
        if not _is_dev_only(path)
    )


def test_the_kinds_are_listed_once_in_this_order() -> None:
    assert list(KINDS) == ["templated", "x_mact", "xmp", "redeliver"]


def test_every_kind_has_its_config_module_and_its_workers_package() -> None:
    for kind, model in KINDS.items():
        assert (ROOT / "config" / "kinds" / f"{kind}.py").is_file(), kind
        assert (ROOT / "workers" / "kinds" / kind / "__init__.py").is_file(), kind
        assert model.__module__ == f"config.kinds.{kind}", (kind, model)
        # The model accepts exactly its own name as `kind`, so the file routes to it alone.
        assert typing.get_args(model.model_fields["kind"].annotation) == (kind,)


def test_the_workers_find_each_kinds_adapter_from_the_list(tmp_path: Path) -> None:
    for kind in KINDS:
        adapter = worker_kinds.adapter_class(kind)
        assert adapter.kind == kind, (kind, adapter)
    assert list(worker_kinds.ADAPTERS) == [k for k in KINDS if worker_kinds.adapter_class(k)]


def _app_without_destinations(tmp_path: Path) -> PostbackRelay:
    empty = tmp_path / "destinations.toml"
    empty.write_text("")
    return create_app(Settings(destinations_file=empty), Destinations([], str(empty)))


def test_the_app_has_a_queue_and_a_delivery_task_for_each_kind_of_the_list(
    tmp_path: Path,
) -> None:
    app = _app_without_destinations(tmp_path)
    assert [q.name for q in app.conf.task_queues] == [queue_for(k) for k in KINDS]
    assert list(app.conf.task_routes) == [task_name_for(k) for k in KINDS]
    assert {task_name_for(k) for k in KINDS} <= set(app.tasks)


def test_two_apps_in_one_process_each_run_their_own_tasks(tmp_path: Path) -> None:
    """Celery offers each task to every app created later unless it is not shared: the tasks
    close over their own app, so a second app in the process (the suite builds many) warned of
    duplicate names, an error under the suite's filterwarnings, and kept only its own."""
    first, second = _app_without_destinations(tmp_path), _app_without_destinations(tmp_path)
    for app in (first, second):
        for kind in KINDS:
            task = app.tasks[task_name_for(kind)]
            assert task.run.__closure__ is not None
            closed_over = [cell.cell_contents for cell in task.run.__closure__]
            assert app in closed_over, (kind, "runs another app's task")


def test_the_cli_takes_its_kinds_and_each_kinds_commands_from_the_list() -> None:
    result = CliRunner().invoke(cli_main.main, ["worker", "--queues", "no_such_kind"])
    assert result.exit_code == 2
    assert f"known: {', '.join(KINDS)}" in result.output
    with_commands = [k for k in KINDS if (ROOT / "workers" / "kinds" / k / "cli.py").is_file()]
    assert list(cli_main.KIND_COMMANDS) == with_commands
    for kind, module in cli_main.KIND_COMMANDS.items():
        group = click.Group()
        module.register(group)
        for name, command in group.commands.items():
            assert cli_main.main.commands[name] is command, (kind, name)
    for (kind, section), commands in cli_main.SENDING_COMMANDS.items():
        assert kind in KINDS
        assert section in {"destination", "reconcile"}
        for path in commands:  # what check-config names is a command that exists
            command: click.Command = cli_main.main
            for word in path.split():
                assert isinstance(command, click.Group), path
                command = command.commands[word]


def _kind_name_collections(path: Path) -> list[int]:
    """Lines of literal tuples, lists, sets and dict keys naming two or more kinds."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        items: list[ast.expr | None] = []
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        names = {i.value for i in items if isinstance(i, ast.Constant) and i.value in KINDS}
        if len(names) >= 2:
            found.append(node.lineno)
    return found


def test_no_production_module_lists_the_kinds_again() -> None:
    registry = ROOT / "config" / "kinds" / "__init__.py"
    again = {
        str(path.relative_to(ROOT)): lines
        for path in production_modules()
        if path != registry and (lines := _kind_name_collections(path))
    }
    assert again == {}, "derive these from config.kinds.KINDS"


@pytest.mark.parametrize("module", ["workers.cli.main", "workers.celery_app", "workers.app",
                                    "producers", "producers.produce"])  # fmt: skip
def test_production_imports_leave_out_the_demo_and_the_sandboxes(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.startswith('workers.dev') or m.endswith('.sandbox')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_no_production_module_is_over_400_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in production_modules()
    }
    too_long = {
        path: n for path, n in lengths.items() if n > MAX_LINES and path not in TOO_LONG_FOR_NOW
    }
    assert too_long == {}, f"split these (at most {MAX_LINES} lines each)"
    fixed = {path for path in TOO_LONG_FOR_NOW if lengths.get(path, 0) <= MAX_LINES}
    assert fixed == set(), "no longer too long: drop these from TOO_LONG_FOR_NOW"


# Calls that build a Redis client or pool; only workers/redis_clients.py makes them.
_CLIENT_BUILDERS = {
    "Redis", "StrictRedis", "from_url", "from_pool", "ConnectionPool", "BlockingConnectionPool",
    "Sentinel", "SentinelConnectionPool", "master_for", "slave_for",
}  # fmt: skip
# The factory, and the dev-only embedded server's readiness probe (it runs before any settings).
_MAY_BUILD_CLIENTS = {"workers/redis_clients.py", "workers/dev/embedded_redis.py"}


def _client_constructions(source: str) -> list[int]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in _CLIENT_BUILDERS:
                found.append(node.lineno)
    return found


def test_the_client_check_finds_every_way_of_building_one() -> None:
    source = (
        "import redis\nfrom redis import Redis\n"
        "a = redis.Redis.from_url(u)\nb = Redis(host='h')\n"
        "c = redis.BlockingConnectionPool(max_connections=2)\n"
        "d = redis.sentinel.Sentinel([('h', 1)]).master_for('m')\n"
    )
    assert _client_constructions(source) == [3, 4, 5, 6, 6]


def test_only_the_client_factory_builds_redis_clients() -> None:
    """Every client and pool comes from workers/redis_clients.py, so every URL form, TLS option
    and timeout of config/redis.py applies to the broker, the limiter, the producer and the CLI
    alike (dev code and sandboxes included)."""
    builders = {
        relative: lines
        for package in PRODUCTION
        for path in sorted((ROOT / package).rglob("*.py"))
        if (relative := str(path.relative_to(ROOT))) not in _MAY_BUILD_CLIENTS
        and (lines := _client_constructions(path.read_text()))
    }
    assert builders == {}, "take these clients from workers/redis_clients.py"

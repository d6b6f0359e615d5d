"""Every error the project defines derives from one base, ``schemas.errors.PostbackRelayError``."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType

from schemas.errors import PostbackRelayError

PACKAGES = ("config", "producers", "schemas", "workers")
# Entry scripts: one patches the standard library with gevent, the other runs the CLI.
NOT_IMPORTED = frozenset({"workers.gevent_worker", "workers.cli.__main__"})


def project_modules() -> Iterator[ModuleType]:
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name not in NOT_IMPORTED:
                yield importlib.import_module(info.name)


def project_errors() -> dict[str, type[BaseException]]:
    """Every exception class defined at module level in the project's packages."""
    found = {}
    for module in project_modules():
        # vars(), not getattr: workers.celery_app builds its app on attribute look-up.
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{value.__qualname__}"] = value
    return found


def test_every_project_error_derives_from_the_one_base() -> None:
    errors = project_errors()
    # The walk finds them at all: these are defined in four different packages.
    assert {
        "config.destination_base.ConfigError",
        "schemas.envelope.PoisonMessage",
        "workers.kinds.xmp.aggregate.XmpReject",
        "workers.broker.transport.NotAKombuMessage",
    } <= errors.keys()
    outside = sorted(
        name for name, cls in errors.items() if not issubclass(cls, PostbackRelayError)
    )
    assert outside == []


def test_errors_keep_the_builtin_base_their_callers_catch() -> None:
    from config.destination_base import SecretsNotResolved
    from schemas.envelope import PoisonMessage
    from schemas.errors import InvalidEvent
    from schemas.macros import TemplateError
    from workers.kinds.xmp.aggregate import XmpReject

    for cls in (InvalidEvent, PoisonMessage, TemplateError, XmpReject):
        assert issubclass(cls, ValueError), cls
    assert issubclass(SecretsNotResolved, RuntimeError)

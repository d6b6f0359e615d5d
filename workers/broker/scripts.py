"""Loads the project's Lua scripts from their files, ``<package>/lua/<name>.lua`` by each store.

Each file starts with a header naming every key it touches and its ARGV (tests/unit/
test_lua_scripts.py holds every file to it). A line ``--@include <name>`` is replaced by
``workers/broker/lua/<name>.lua``: that is how a script publishes a task message exactly as
kombu would (``kombu_publish``) without knowing kombu's layout itself. The files are package
data, so an installed wheel finds them the same way a checkout does.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import redis
from redis.commands.core import Script

_INCLUDE = re.compile(r"^--@include (\w+)[ \t]*$", re.MULTILINE)


@functools.cache
def script_text(package: str, name: str) -> str:
    """The script's source with its includes expanded (read once per process)."""
    text = resources.files(package).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: script_text("workers.broker", m.group(1)), text)


def load_script(client: redis.Redis, package: str, name: str) -> Script:
    """``client.register_script`` for ``<package>/lua/<name>.lua``; call it with keys= and args=
    as the file's header says (redis-py runs it by its SHA, loading it again after a restart)."""
    return client.register_script(script_text(package, name))

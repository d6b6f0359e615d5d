"""What the README and the example destinations file tell a new user is checked against the code:
the example passes `postback-relay check-config`, so does every section it keeps commented out,
and every TOML block, setting and X event-name mapping in the README is the real one."""

from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from config.api_clients import load_api_clients
from config.destinations import load_destinations, parse_destinations
from config.kinds import KINDS
from config.kinds.x_mact import DEFAULT_X_CONVERSIONS
from config.settings import ENV_PREFIX, Settings
from workers.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "destinations.example.toml"
README = ROOT / "README.md"

# Dummy values for every secret the example and the README name. X's partner key must be base64.
SECRETS = {
    "ADNETWORK_API_KEY": "adnetwork-k3y",
    "ANALYTICS_TOKEN": "analytics-t0ken",
    "X_CONSUMER_KEY": "x-consumer-key",
    "X_CONSUMER_SECRET": "x-consumer-secret",
    "X_ACCESS_TOKEN": "x-access-token",
    "X_ACCESS_TOKEN_SECRET": "x-access-token-secret",
    "X_PARTNER_KEY": base64.b64encode(b"x-partner-key").decode(),
    "XMP_TOKEN": "xmp-t0ken",
    "APPMETRICA_TOKEN": "appmetrica-t0ken",
}
ACTIVE = ["adnetwork-installs", "analytics-purchases"]
COMMENTED_OUT = ["x-mact", "xmp", "redeliver"]

# A commented-out TOML line in the example's optional sections: "# " then a table header or a
# key assignment. Prose lines never start that way.
_COMMENTED_TOML = re.compile(r"^# (?=\[|[a-z_]+ = )", re.MULTILINE)


def check_config(path: Path) -> tuple[int, str]:
    env = {"POSTBACK_RELAY_DESTINATIONS_FILE": str(path), **SECRETS}
    result = CliRunner().invoke(main, ["check-config"], env=env)
    return result.exit_code, result.output


def uncommented_example() -> str:
    """The example with its optional sections (after the first '# ---' rule) switched on."""
    text = EXAMPLE.read_text()
    head, rule, optional = text.partition("\n# ---")
    assert rule, "the example's optional sections start with a '# ---' rule"
    return head + rule + _COMMENTED_TOML.sub("", optional)


def test_the_example_destinations_file_passes_check_config() -> None:
    code, output = check_config(EXAMPLE)
    assert code == 0, output
    for name in ACTIVE:
        assert re.search(rf"^\s+{re.escape(name)}\s", output, re.MULTILINE), output
    for name in COMMENTED_OUT:
        assert not re.search(rf"^\s+{re.escape(name)}\s", output, re.MULTILINE), output


def test_the_examples_commented_out_sections_pass_check_config_once_uncommented(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "destinations.toml"
    copy.write_text(uncommented_example())
    code, output = check_config(copy)
    assert code == 0, output
    for name in ACTIVE + COMMENTED_OUT:
        assert re.search(rf"^\s+{re.escape(name)}\s", output, re.MULTILINE), output
    destinations = load_destinations(copy).with_secrets(SECRETS, kinds=KINDS)
    assert list(destinations.reconcile) == ["main-app"]
    assert destinations.reconcile["main-app"].token_value() == SECRETS["APPMETRICA_TOKEN"]
    assert destinations.get("x-mact").secret("partner_key") == SECRETS["X_PARTNER_KEY"]


def test_the_example_needs_no_secret_file() -> None:
    """Credentials by environment variable, so the example runs without writing under /run."""
    for table in tomllib.loads(uncommented_example()).get("destination", []):
        for name, ref in table.get("credentials", {}).items():
            assert set(ref) == {"env"}, f"{table['name']}: credentials.{name}: {ref}"


def readme_toml_blocks() -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def test_every_toml_block_in_the_readme_is_a_valid_destinations_file() -> None:
    blocks = [b for b in readme_toml_blocks() if "[[client]]" not in b]
    assert len(blocks) >= 4  # templated, X, XMP, reconciler
    for block in blocks:
        destinations = parse_destinations(tomllib.loads(block), "README block").with_secrets(
            SECRETS, kinds=KINDS
        )
        assert len(destinations) >= 1


def test_the_readmes_api_clients_block_is_a_valid_clients_file(tmp_path: Path) -> None:
    (block,) = [b for b in readme_toml_blocks() if "[[client]]" in b]
    path = tmp_path / "api_clients.toml"
    path.write_text(block)
    (client,) = load_api_clients(path, {"INGEST_TOKEN_GO": "t" * 32})
    assert client.name == "go-backend"
    assert client.allows("id123456789")
    assert not client.allows("id999")
    assert client.rate_limit is not None


def test_the_readmes_x_event_name_table_is_the_built_in_mapping() -> None:
    rows = re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \| `([A-Z_]+)` \|$", README.read_text(), re.M)
    documented = {
        name: conversion_type
        for names, conversion_type in rows
        for name in re.findall(r"`([a-z_]+)`", names)
    }
    assert documented == DEFAULT_X_CONVERSIONS


def readme_settings_table() -> str:
    text = README.read_text()
    start = text.index("| setting | default |")
    return text[start : text.index("\n\n", start)]


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readmes_settings_table(field: str) -> None:
    table = readme_settings_table()
    name = field.upper()
    assert f"`{ENV_PREFIX}{name}`" in table or f"`_{name}`" in table, f"{ENV_PREFIX}{name}"

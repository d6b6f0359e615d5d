.PHONY: install demo test test-fast lint bench

install:
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"

demo:
	.venv/bin/postback-relay demo --duration 20

test:
	.venv/bin/python -m pytest

# The inner loop: everything but the tests that start real processes (about a minute).
test-fast:
	.venv/bin/python -m pytest -m "not integration"

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:
	.venv/bin/python bench/produce.py

.PHONY: install demo test lint bench

install:
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"

demo:
	.venv/bin/postback-relay demo --duration 20

test:
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:
	.venv/bin/python bench/produce.py

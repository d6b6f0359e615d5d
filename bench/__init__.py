"""Benchmarks for postback-relay; see bench/README.md."""

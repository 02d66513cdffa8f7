# pg_sharding: see README.md. Every target installs what it needs first (scripts/setup.sh).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
export PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
DEMO_DIR ?= /tmp/pg_sharding/cluster
DEMO_PORT ?= 9700
export DEMO_DIR DEMO_PORT

.PHONY: setup install demo demo-stop test soak unit bench clean

setup:
	@bash scripts/setup.sh

## Build in release mode and install into the system PostgreSQL 15 (running servers keep working).
install: setup
	@bash scripts/install.sh release

## A local cluster: coordinator on 127.0.0.1:$(DEMO_PORT), two workers on the next ports.
demo: install
	@bash scripts/demo.sh

demo-stop:
	@bash scripts/cluster.sh stop --dir $(DEMO_DIR)

## Every test tier (unit, in-database, multi-node), ending with a summary line.
test: setup
	@bash scripts/test.sh

## The two-phase-commit failure tests, longer: SOAK rounds per scenario (default 100), after
## the test build is installed (make test installs it).
SOAK ?= 100
soak: setup
	@bash scripts/install.sh debug
	PG_SHARDING_SOAK=$(SOAK) cargo test -p pg_sharding_multinode --test twophase bank_ -- --nocapture --test-threads=1

## Only the pure-logic unit tests (milliseconds, no PostgreSQL needed).
unit:
	cargo test -p sharding_core

## COPY throughput of a distributed table against a single server (needs make install).
bench: install
	@bash benches/copy_load.sh

clean:
	cargo clean

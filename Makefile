# Shoal: common tasks. `make run` starts a broker on the embedded defaults;
# `make test` installs what the tests need and runs everything CI checks.

CARGO ?= cargo
ARGS ?=
# loadgen's goose `rest` scenario is behind a cargo feature (goose's build
# is heavy); CI builds, lints and tests it.
FEATURES ?= --features shoal-loadgen/rest
FUZZ_SECONDS ?= 60
FUZZ_TEST_SECONDS ?= 10

.PHONY: plan hundred-k run build check test test-deps lint fmt fuzz bench profile smoke soak observe web-test cluster cluster-down compare compare-sockudo clean
NODES ?= 3

## Start the broker (release build) on 127.0.0.1:8080 with data in ./data.
run:
	$(CARGO) run --release -p shoal-broker --bin shoal -- $(ARGS)

## Release build of every binary (shoal, loadgen).
build:
	$(CARGO) build --release --locked --workspace

## A local cluster: Redis, NODES brokers on the Redis bus, nginx with TLS
## in front (installs redis-server and nginx when missing); prints the URLs.
cluster: build
	./scripts/install-test-deps.sh >/dev/null
	./scripts/cluster.sh up $(NODES)

## Stop exactly the processes `make cluster` started.
cluster-down:
	./scripts/cluster.sh down

## Everything CI checks: install test dependencies, lint, all tests, then
## the latency smoke gate (p99 < 50 ms, zero loss) on the debug binaries.
test: test-deps lint
	$(CARGO) test --workspace --all-targets $(FEATURES)
	SKIP_BUILD=1 ./scripts/web-tests.sh
	SHOAL_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug/shoal npm test --prefix clients/js
	SKIP_BUILD=1 ./scripts/smoke.sh
	COMPARE_CHECK=1 SKIP_BUILD=1 ./scripts/compare.sh
	SKIP_BUILD=1 ./scripts/plan-check.sh
	./scripts/cluster-check.sh
	./scripts/deploy-check.sh
	FUZZ_DEV=1 ./scripts/fuzz.sh $(FUZZ_TEST_SECONDS)

## The web client in headless Chromium (two users, DMs, restart, XSS).
web-test:
	./scripts/web-tests.sh

## One hour of steady load with connection churn; fails on loss, p99 drift
## or unbounded RSS growth (SOAK_SECONDS=600 for the short version).
soak:
	./scripts/soak.sh

## Capacity plans for the example workloads (release build), each with
## --verify: calibrates once (cached in results/calibration-<host>.json),
## writes results/plan-<workload>/. Other workloads:
## make plan WORKLOADS="--workload my.toml"
plan:
	./scripts/plan.sh $(WORKLOADS)

## 100,000 concurrent connections on this box: 6 brokers on the Redis bus,
## loadgen connect in 6 processes, a fanout through rooms spanning the
## nodes while all are held; writes results/hundred-k-<time>/.
hundred-k:
	./scripts/install-test-deps.sh >/dev/null
	./scripts/hundred-k.sh

## Shoal against Socket.IO (one node; NODES=2: the Redis adapter against
## Shoal's Redis bus), same scenario
## on both; writes results/compare-socketio-<time>.json and
## a chart. Other shapes: make compare ARGS="--rate 5000 --members 50"
compare:
	./scripts/install-test-deps.sh >/dev/null
	NODES=$(if $(filter command line,$(origin NODES)),$(NODES),1) ./scripts/compare.sh $(ARGS)

## Shoal against sockudo 5.2.0 (Pusher protocol, Rust), built once with
## cargo install into ~/.cache/shoal; NODES=2: its Redis adapter against
## Shoal's Redis bus. Writes results/compare-sockudo-<time>.json.
compare-sockudo:
	./scripts/install-test-deps.sh >/dev/null
	TARGET=sockudo NODES=$(if $(filter command line,$(origin NODES)),$(NODES),1) ./scripts/compare.sh $(ARGS)

## ~10 s fanout over a few hundred connections, gated on absolute bounds.
smoke:
	./scripts/smoke.sh

## Prometheus (Debian package) scraping `make run`/`make cluster` brokers and
## loadgen --metrics-listen 127.0.0.1:9102, on http://127.0.0.1:9090.
observe:
	./scripts/observe.sh

## Install what the tests need (idempotent; apt packages only when missing).
test-deps:
	./scripts/install-test-deps.sh

## rustfmt check and clippy with warnings as errors.
## The inner loop, about a minute warm: format check, clippy on the
## workspace (without the heavy loadgen `rest` feature) and unit tests.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --lib --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

fmt:
	$(CARGO) fmt --all

## The standard single-node capacity run (about two minutes): a release
## broker on loopback, the publish rate stepped up until p99 passes 50 ms;
## writes results/bench-capacity.json and charts in results/bench-charts/.
## Other runs: make bench SCENARIO=fanout BENCH_ARGS="--rate 20000 ..."
SCENARIO ?= capacity
BENCH_ARGS ?= --rooms 20 --members 10 --publishers 40 --rate 1000 --step-factor 1.5 --duration 5 --warmup 1 --out results/bench-capacity.json
bench:
	./scripts/bench.sh $(SCENARIO) $(BENCH_ARGS)
	@if [ "$(SCENARIO)" = capacity ] && [ -f results/bench-capacity.json ]; then \
		$${CARGO_TARGET_DIR:-target}/release/loadgen report results/bench-capacity.json --out results/bench-charts; fi

## Profile the broker under a fanout scenario with perf: a flamegraph and
## a top-symbols list in results/profile-$(NAME).{svg,txt}. Needs perf
## (apt linux-perf) and inferno (cargo install inferno).
NAME ?= rooms1000-100k
PROFILE_ARGS ?= --rooms 2 --members 1000 --publishers 4 --rate 100 --payload 64
profile:
	./scripts/profile.sh $(NAME) $(PROFILE_ARGS)

## Run every fuzz target for FUZZ_SECONDS each (stable toolchain; `make test`
## runs each for FUZZ_TEST_SECONDS).
fuzz:
	./scripts/fuzz.sh $(FUZZ_SECONDS)

clean:
	$(CARGO) clean

# walkv build and test entry points. `make help` lists them.
CARGO ?= cargo
BINS := frontend storage client

.PHONY: all build test check cluster clean clean-data help chaos soak

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

all: ## release build; leaves ./frontend ./storage ./client at the repo root
	$(CARGO) build --release --bins
	@for b in $(BINS); do cp target/release/$$b ./$$b; done
	@echo "built ./frontend ./storage ./client"

build: ## debug build of the three binaries (the integration tests run these)
	$(CARGO) build --bins

test: build ## every test: unit tests and the multi-process drills
	$(CARGO) test --workspace

SEED ?= $(shell date +%s)
DURATION ?= 10
SEEDS ?= 200
MINUTES ?= 15
RUN_SECS ?= 4

chaos: build ## one randomized fault run: make chaos SEED=7 DURATION=10 (prints the seed; keeps the run dir on failure)
	$(CARGO) build -p walkv-tests --bin chaos
	./target/debug/chaos --seed $(SEED) --duration-secs $(DURATION)

soak: build ## many seeds: make soak SEEDS=200 MINUTES=15 [SEED=first RUN_SECS=4]; prints a summary
	$(CARGO) build -p walkv-tests --bin chaos
	./target/debug/chaos --seed $(SEED) --runs $(SEEDS) --minutes $(MINUTES) --duration-secs $(RUN_SECS)

check: ## fmt check, clippy -D warnings, tests, docs with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(MAKE) test
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

cluster: all ## start frontend + 3 storage nodes with data under ./data (Ctrl-C stops them)
	./scripts/cluster.sh

clean-data: ## delete ./data (the local cluster's WALs, snapshots and state)
	rm -rf data

clean: clean-data ## remove build output and binaries
	$(CARGO) clean
	rm -f $(BINS)

# tierdisk: `make serve` starts the service on its default volume; `make test` runs the checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEBIAN_TOOLS := prometheus qemu-utils libnbd-bin nbdkit fio docker-compose python3-libnbd openssl

.PHONY: serve test lint typecheck pytest deps bench bench-quick proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tierdisk serve

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/ruff check scripts/gen-proto

typecheck: $(STAMP)
	$(BIN)/mypy -p tierdisk.service -p tierdisk.client
	MYPYPATH=.typecheck:tests $(BIN)/mypy --strict tests deploy/healthcheck.py
	MYPYPATH=bench $(BIN)/mypy --strict bench/*.py
	$(BIN)/python scripts/gen-proto --check

pytest: $(STAMP)
	$(BIN)/pytest -q

# Debian tools the protocol and observability tests use (they skip without them, unless
# TIERDISK_REQUIRE_TOOLS=1). Needs root.
deps:
	apt-get update -q && apt-get install -y -q $(DEBIAN_TOOLS)

bench: $(STAMP)
	bench/run

bench-quick: $(STAMP)
	bench/run --quick

proto: $(STAMP)
	$(BIN)/python scripts/gen-proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

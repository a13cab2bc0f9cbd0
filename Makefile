# The two set-up commands of the README: `make run` and `make test`. Both install first.
.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	.venv/bin/slimformer run

# scripts/postgres.sh starts a local PostgreSQL server for the scale-out test and prints its URL
# (a URL already in SLIMFORMER_TEST_POSTGRES is used instead); if it cannot, that test is
# skipped, or fails under CI=true.
test: install
	SLIMFORMER_TEST_POSTGRES="$${SLIMFORMER_TEST_POSTGRES:-$$(bash scripts/postgres.sh || true)}" \
	  .venv/bin/python -m pytest -q

lint: install
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/lint-imports  # layers and no cycles (.importlinter)

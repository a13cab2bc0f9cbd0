# The two set-up commands of the README: `make run` and `make test`. Both install first.
.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	.venv/bin/slimformer run

test: install
	.venv/bin/python -m pytest -q

lint: install
	.venv/bin/ruff check src tests benchmarks

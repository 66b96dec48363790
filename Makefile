# Thin wrappers over uv: every target is one or two commands you can also type yourself.
# `make` alone lists them. uv uses the machine's Python and never downloads one.

.DEFAULT_GOAL := help
UV ?= uv
export UV_PYTHON_DOWNLOADS := never

.PHONY: help lint format typecheck test test-isolated test-integration bench check ci

help: ## List the targets (this text)
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

lint: ## Lint and check formatting (ruff check, ruff format --check)
	$(UV) run ruff check .
	$(UV) run ruff format --check .

format: ## Fix what ruff can fix and format the code
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

typecheck: ## Type-check the five packages' sources (mypy)
	$(UV) run mypy packages/*/src

test: ## Run every test suite, the README's test command (uv run pytest)
	HF_HUB_OFFLINE=1 $(UV) run pytest

test-isolated: ## Run each package's tests in its own environment (PACKAGES="core gguf" to choose)
	HF_HUB_OFFLINE=1 $(UV) run python tools/test_isolated.py $(PACKAGES)

test-integration: ## Run the cross-package and real-model tests (tests-integration/)
	HF_HUB_OFFLINE=1 $(UV) run pytest tests-integration

bench: ## Benchmark generation speed (tools/bench_generate.py)
	$(UV) run python tools/bench_generate.py

check: ## Check the layering: import-linter contract, private imports, lockstep versions
	$(UV) run lint-imports
	$(UV) run python tools/check_private_imports.py
	$(UV) run python tools/check_versions.py

ci: ## Run what CI runs (.ci/run)
	bash .ci/run

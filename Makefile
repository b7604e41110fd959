# The two commands the README promises. Both install what they need into .venv.
.PHONY: setup setup-lmeval demo test lint

setup:
	bash scripts/setup_env.sh

# Main job: the whole study on the embedded default model (see README).
demo: setup
	.venv/bin/sae-steer demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy sae_steer_vllm sae_training benchmarks

# lm-evaluation-harness in its own environment (.venv-lmeval) for tests/test_eval_lmeval.py.
setup-lmeval:
	bash scripts/setup_lmeval_env.sh

# Tests: set-up from scratch, lint, type-check, then the whole suite.
test: lint setup-lmeval
	.venv/bin/python -m pytest -q -ra --durations=15

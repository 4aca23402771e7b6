# Sourced by tests/run.sh and tests/data/quickstart.sh (from the repository root): a Python venv
# under target/ with the pinned test packages (Pillow and numpy for the data script, onnxruntime for
# the export check), then the composited photo set (cached).
py=target/pyenv/bin/python
if [ ! -x "$py" ]; then
    mkdir -p target
    python3 -m venv target/pyenv
fi
"$py" -m pip install --quiet --disable-pip-version-check -r tests/data/requirements.txt
"$py" tests/data/make_dataset.py --out target/graft-data/kiosk

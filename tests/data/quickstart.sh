#!/usr/bin/env bash
# The README's first command: a few-shot round trip on the bundled model.
# Makes the example photo set, trains a head on 5 photos per class, predicts on photos it has
# never seen (including two classes it was never taught, which should come out `unknown`).
set -euo pipefail
cd "$(dirname "$0")/../.."

py=target/pyenv/bin/python
if [ ! -x "$py" ]; then
    mkdir -p target
    python3 -m venv target/pyenv
fi
"$py" -m pip install --quiet --disable-pip-version-check -r tests/data/requirements.txt
"$py" tests/data/make_dataset.py --out target/graft-data/kiosk

cargo build --release --quiet
graft=target/release/graft
data=target/graft-data/kiosk
demo=target/graft-demo
rm -rf "$demo" && mkdir -p "$demo/train"
for class in birds mammals fruit vegetables flowers; do
    mkdir -p "$demo/train/$class"
    # 5 objects per class, first shot of each
    ls "$data/$class" | grep '_0\.jpg$' | awk 'NR % 5 == 1' | head -5 | while read -r f; do
        ln -s "$PWD/$data/$class/$f" "$demo/train/$class/$f"
    done
done

echo "== graft classify (ImageNet, the backbone used directly)"
"$graft" classify --top 3 tests/fixtures/images/chelsea.jpg
echo "== graft train (5 photos per class, head chosen by cross-validation)"
"$graft" train "$demo/train" --out "$demo/kiosk.graft"
echo "== graft predict on photos it has never seen"
"$graft" predict --head "$demo/kiosk.graft" \
    "$data/mammals/zebra_1.jpg" "$data/fruit/banana_1.jpg" "$data/birds/tucan_1.jpg" \
    "$data/tools/$(ls "$data/tools" | head -1)" "$data/instruments/$(ls "$data/instruments" | head -1)"
echo "== graft eval: 5-shot accuracy over 5 random draws, confusion matrix picture"
"$graft" eval "$data" --shots 5 --trials 5 --plot "$demo/confusion.svg" | head -3
echo "pictures: $demo/confusion.svg"

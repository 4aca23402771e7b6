#!/usr/bin/env bash
# The README's first command: a few-shot round trip on the bundled model.
# Makes the example photo set, trains a head on 10 objects per class (2 photos each), predicts on objects it has
# never seen (including two classes it was never taught, which should come out `unknown`).
set -euo pipefail
cd "$(dirname "$0")/../.."

source tests/data/photoset.sh

cargo build --release --quiet
graft=target/release/graft
data=target/graft-data/kiosk
demo=target/graft-demo
rm -rf "$demo" && mkdir -p "$demo/train"
unseen=()
for class in birds mammals fruit vegetables flowers; do
    mkdir -p "$demo/train/$class"
    # The objects of a class, alphabetically; every other one (up to 10) is taught, with both of
    # its photos, as a kiosk user would capture it; the first of the others is kept unseen.
    objects=$(ls "$data/$class" | sed 's/_[0-9]*\.jpg$//' | sort -u)
    for o in $(echo "$objects" | awk 'NR % 2 == 1' | head -10); do
        ln -s "$PWD/$data/$class/${o}_0.jpg" "$PWD/$data/$class/${o}_1.jpg" "$demo/train/$class/"
    done
    unseen+=("$data/$class/$(echo "$objects" | awk 'NR % 2 == 0' | head -1)_0.jpg")
done
mkdir -p "$demo/all"
for class in birds mammals fruit vegetables flowers; do ln -s "$PWD/$data/$class" "$demo/all/$class"; done
unseen+=("$data/tools/$(ls "$data/tools" | head -1)" "$data/instruments/$(ls "$data/instruments" | head -1)")

echo "== graft classify (ImageNet, the backbone used directly)"
"$graft" classify --top 3 tests/fixtures/images/chelsea.jpg
echo "== graft train (10 objects per class, 2 photos each; head chosen by cross-validation)"
"$graft" train "$demo/train" --out "$demo/kiosk.graft"
echo "== graft predict on objects it has never seen (the last two are classes it was never taught)"
"$graft" predict --head "$demo/kiosk.graft" "${unseen[@]}"
echo "== graft eval: 10-shot accuracy on the 5 classes over 5 random draws, confusion matrix picture"
"$graft" eval "$demo/all" --shots 10 --trials 5 --plot "$demo/confusion.svg"
echo "pictures: $demo/confusion.svg"

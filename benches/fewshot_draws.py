"""The few-shot draws the reference scripts share (few_shot_reference.py, pooling.py): which
object a photo shows, and `shots` photos per class for training with the test photos from other
objects. numpy's draws, not graft's: compare variants with each other, not with `graft curve`."""
import re

import numpy as np


def object_groups(labels, paths):
    """`<label>/<object>` per photo, from files named `<object>_<n>.<ext>`."""
    return np.array(
        [l + "/" + re.sub(r"_\d+$", "", p.split("/")[-1].rsplit(".", 1)[0]) for l, p in zip(labels, paths)]
    )


def draw(y, grp, shots, seed):
    """Training indices (`shots` per class) and test indices (photos of objects not trained on)."""
    rng = np.random.default_rng(seed)
    tr = []
    for c in range(int(y.max()) + 1):
        idx = np.where(y == c)[0]
        rng.shuffle(idx)
        tr += list(idx[:shots])
    used = set(grp[tr])
    te = [i for i in range(len(y)) if i not in tr and grp[i] not in used]
    return tr, te

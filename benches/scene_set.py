#!/usr/bin/env python3
"""Build a "kiosk scene" photo set: every object of the project's photo set pasted onto ONE fixed
scene (a background photo seen through a camera that barely moves), plus frames of the empty scene.
This is what a kiosk sees, unlike target/graft-data/kiosk where every photo has its own background;
it is the benchmark for domain adaptation (issue 16: statistics of unlabelled frames of the kiosk's
own scene) and for the "teach the empty scene" (background class) workflow.

    target/pyenv/bin/python benches/scene_set.py --out target/graft-data/scenes

Output: OUT/<scene>/objects/<class>/<stamp>_<k>.jpg and OUT/<scene>/empty/empty_<k>.jpg, one
folder per scene, with OUT/MANIFEST.json (`graft eval OUT/wood/objects --open-set` runs on one
scene's objects). Sources, licences and the object/camera recipe are those of
tests/data/make_dataset.py (imported); only the background differs: a fixed crop of one photo,
shifted and scaled by at most 2% per frame (a camera on a stand), never mirrored.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "data"))
import make_dataset as md  # noqa: E402

# Scenes a kiosk might stand over: a wooden table top, window blinds, a lawn.
SCENES = {"wood": "Wood.jpg", "blinds": "Blinds.jpg", "meadow": "GreenMeadow.jpg"}


def scene_view(bg: Image.Image, W: int, H: int, rng: random.Random) -> Image.Image:
    """The fixed view of one scene (60% of the largest 4:3 crop, centred), jittered by <= 2%."""
    aspect = W / H
    cw = min(bg.width, bg.height * aspect) * 0.6 * rng.uniform(0.98, 1.02)
    ch = cw / aspect
    x0 = (bg.width - cw) / 2 + rng.uniform(-0.02, 0.02) * cw
    y0 = (bg.height - ch) / 2 + rng.uniform(-0.02, 0.02) * ch
    return bg.resize((W, H), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="target/graft-data/scenes")
    ap.add_argument("--per-stamp", type=int, default=2)
    ap.add_argument("--empty", type=int, default=40, help="frames of the empty scene per scene")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(md.DEFAULT_CACHE))
    args = ap.parse_args()
    W, H = 320, 240
    out = Path(args.out)
    if (out / "MANIFEST.json").exists():
        md.log(f"{out}: exists, nothing to do (delete it to rebuild)")
        return 0
    _, roots, stanzas = md.fetch_sources(Path(args.cache).expanduser())
    bg_files, bg_info = md.background_files(roots, stanzas)
    by_name = dict(zip([p.name for p in bg_files], zip(bg_files, bg_info)))
    stamps_root = roots["tuxpaint-stamps-default"] / md.STAMPS_ROOT
    counts = {}
    for scene, photo in SCENES.items():
        bg = md.load_background(by_name[photo][0])
        for cls in md.CLASSES:
            stamps, _ = md.find_stamps(stamps_root, cls)
            (out / scene / "objects" / cls).mkdir(parents=True, exist_ok=True)
            for s in stamps:
                src = Image.open(s["path"]).convert("RGBA")
                for k in range(args.per_stamp):
                    sd = md.image_seed(args.seed, f"{scene}/{cls}", s["name"], k)
                    rng, nrng = random.Random(sd), np.random.Generator(np.random.PCG64(sd))
                    frame = scene_view(bg, W, H, rng)
                    md.paste_object(frame, src, rng)
                    md.camera(frame, rng, nrng).save(out / scene / "objects" / cls / f"{s['name']}_{k}.jpg",
                                                        quality=85)
                    counts[f"{scene}/{cls}"] = counts.get(f"{scene}/{cls}", 0) + 1
        (out / scene / "empty").mkdir(parents=True, exist_ok=True)
        for k in range(args.empty):
            sd = md.image_seed(args.seed, f"{scene}/empty", "empty", k)
            rng, nrng = random.Random(sd), np.random.Generator(np.random.PCG64(sd))
            md.camera(scene_view(bg, W, H, rng), rng, nrng).save(out / scene / "empty" / f"empty_{k}.jpg", quality=85)
        counts[f"{scene}/empty"] = args.empty
        md.log(f"[scene] {scene}: {sum(v for c, v in counts.items() if c.startswith(scene + '/'))} frames")
    manifest = {"description": __doc__.split("\n\n")[0], "scenes": {s: by_name[p][1] for s, p in SCENES.items()},
                "counts": counts, "seed": args.seed, "per_stamp": args.per_stamp}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

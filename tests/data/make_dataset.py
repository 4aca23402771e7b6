#!/usr/bin/env python3
"""Build a small, seeded, kiosk-camera-like labelled photo set (ImageFolder layout).

Objects are the photographic cut-out stamps (PNG with alpha) of the Debian package
`tuxpaint-stamps-default` (GPL-2); backgrounds are photographs from the Debian
packages `lomiri-wallpapers-16.04` (CC-BY-4.0 / CC-BY-SA-4.0) and
`mate-backgrounds` (GPL-2+). The .debs are fetched by this script into a cache
and are never committed; neither are the generated images.

Output:  OUT/<class>/<stamp>_<k>.jpg  +  OUT/MANIFEST.json

Every image of one stamp lies in one class folder and carries the stamp name in
its file name, so a split grouped by stamp is possible.  Each image is drawn
from its own RNG stream, seeded from (seed, class, stamp, k), so the same
parameters give byte-identical output (same Pillow/libjpeg build), and adding or
removing a class does not change the images of the others.

Only pillow and numpy are needed (see requirements.txt).  See README.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

SCRIPT_VERSION = 1  # bump when the generation recipe changes (invalidates old outputs)

# --------------------------------------------------------------------------------------
# Sources (Debian bookworm).  Versions and sha256 are the ones this recipe was made with;
# a different version is used (with a warning) only if the pinned one can't be fetched.
# --------------------------------------------------------------------------------------
PACKAGES = {
    "tuxpaint-stamps-default": {
        "version": "2022.06.04-1",
        "sha256": "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
        "licence": "GPL-2",
        "role": "objects",
        # extract only what we use
        "keep": lambda p: (p.startswith("usr/share/tuxpaint/stamps/") and p.endswith((".png", ".txt", ".svg")))
        or p.endswith("/copyright"),
    },
    "lomiri-wallpapers-16.04": {
        "version": "20.04.0-2",
        "sha256": "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
        "licence": "CC-BY-4.0 / CC-BY-SA-4.0 (per file, see debian/copyright)",
        "role": "backgrounds",
        "keep": lambda p: p.endswith((".jpg", "/copyright")),
    },
    "mate-backgrounds": {
        "version": "1.26.0-1",
        "sha256": "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
        "licence": "GPL-2+ (per file, see debian/copyright)",
        "role": "backgrounds",
        "keep": lambda p: p.endswith((".jpg", "/copyright")),
    },
}

# Background photographs actually used (package -> basenames).  Chosen by looking at every
# photo in the two packages: left out are illustrations/abstracts (umang, analogpattern,
# Elephants*, GreenTraditional, ...) and photos showing a salient object that is, or is
# close to, one of our classes (Picture_0B: a fig; free: a bird; friends: dogs; seeding:
# dandelions; Dragonfly: an insect; Wine: a djembe drum; Picture_1A: paint brushes;
# FreshFlower, Garden, LadyBird, YellowFlower, TwoWings: flowers).
BACKGROUNDS = {
    "lomiri-wallpapers-16.04": [
        "Bridge_by_Sander_Klootwijk.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "sunset_by_Aitzol_Berasategi.jpg",
    ],
    "mate-backgrounds": [
        "Aqua.jpg",
        "Blinds.jpg",
        "Dune.jpg",
        "GreenMeadow.jpg",
        "RainDrops.jpg",
        "Storm.jpg",
        "Wood.jpg",
    ],
}

STAMPS_ROOT = "usr/share/tuxpaint/stamps"
# class -> stamp folders (searched recursively; cartoon/toy/plastic sub-folders skipped)
CLASSES = {
    "birds": ["animals/birds"],
    "mammals": ["animals/mammals", "animals/marsupials"],
    "fruit": ["food/fruit"],
    "vegetables": ["food/vegetables"],
    "flowers": ["plants/flowers"],
    # extra classes: one to add later, the others never trained (open-set / unknown tests)
    "sea_animals": ["animals/fish", "animals/shellfish"],
    "tools": ["household/tools"],
    "instruments": ["hobbies/music"],
}
BASE_CLASSES = ["birds", "mammals", "fruit", "vegetables", "flowers"]
ROLES = {
    "base": BASE_CLASSES,
    "add_later": ["sea_animals"],
    "open_set_unknown": ["tools", "instruments"],
}
SKIP_SUBDIRS = {"cartoon", "toys", "plastic"}

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graft" / "debs"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Fetching and extracting .debs
# --------------------------------------------------------------------------------------
def fetch_deb(pkg: str, cache: Path) -> Path:
    """Return the path of the pinned .deb in `cache`, downloading it if needed.

    Order: cached file -> `apt-get download pkg=version` -> `apt-get download pkg`
    (whatever version apt has; warns)."""
    meta = PACKAGES[pkg]
    ver = meta["version"]
    cache.mkdir(parents=True, exist_ok=True)
    fname = f"{pkg}_{ver.replace(':', '%3a')}_all.deb"
    target = cache / fname
    if target.exists():
        return target
    log(f"[fetch] {pkg} {ver} -> {cache}")
    if shutil.which("apt-get"):
        r = subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=cache,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 and "Unable to locate" in r.stderr:
            log("[fetch] apt does not know the package; trying `apt-get update` first")
            subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=cache,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if target.exists():
            return target
    if shutil.which("apt-get"):
        log(f"[fetch] WARNING: pinned {pkg} {ver} unavailable, using apt's candidate version; "
            "output will differ from the reference")
        before = set(cache.glob(f"{pkg}_*.deb"))
        subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        new = sorted(set(cache.glob(f"{pkg}_*.deb")) - before) or sorted(cache.glob(f"{pkg}_*.deb"))
        if new:
            return new[-1]
    raise SystemExit(f"could not fetch {pkg}")


class _Bounded(io.RawIOBase):
    """Read-only view of `size` bytes of an open file starting at its current position."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        data = self.f.read(n)
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def extract_deb(deb: Path, dest: Path, keep) -> None:
    """Extract the members of the .deb's data.tar.* for which keep(path) is true.

    Pure Python (ar + tarfile) so it works without dpkg; falls back to
    `dpkg-deb --fsys-tarfile` for compressions tarfile can't read (e.g. zstd)."""
    done = dest / ".complete"
    if done.exists():
        return
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"[extract] {deb.name}")

    def run_tar(fileobj, mode):
        with tarfile.open(fileobj=fileobj, mode=mode) as tf:
            for m in tf:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if not m.isfile() or not keep(name) or ".." in Path(name).parts:
                    continue
                out = tmp / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SystemExit(f"{deb} is not a .deb (ar archive)")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise SystemExit(f"no data.tar in {deb}")
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            if name.startswith("data.tar"):
                comp = name[len("data.tar"):]
                mode = {"": "r|", ".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2"}.get(comp)
                if mode is not None:
                    run_tar(io.BufferedReader(_Bounded(f, size), 1 << 20), mode)
                else:
                    p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
                    run_tar(p.stdout, "r|")
                    if p.wait() != 0:
                        raise SystemExit(f"dpkg-deb failed on {deb}")
                break
            f.seek(size + (size & 1), 1)
    tmp.rename(dest)
    (dest / ".complete").write_text("ok\n")


def parse_copyright(path: Path) -> list[tuple[list[str], str, str]]:
    """Minimal DEP-5 parser: [(file globs, copyright, licence)]."""
    out = []
    if not path.exists():
        return out
    for para in re.split(r"\n\s*\n", path.read_text(errors="replace")):
        fields, key = {}, None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                key = m.group(1).lower()
                fields[key] = m.group(2)
            elif key and line.startswith((" ", "\t")):
                fields[key] += "\n" + line.strip()
        if "files" in fields and "license" in fields:
            globs = fields["files"].split()
            out.append((globs, fields.get("copyright", "").strip(), fields["license"].splitlines()[0].strip()))
    return out


def file_licence(stanzas, basename: str) -> dict:
    for globs, cr, lic in reversed(stanzas):  # DEP-5: last match wins
        if any(fnmatch.fnmatch(basename, os.path.basename(g)) for g in globs):
            return {"copyright": cr, "licence": lic}
    return {"copyright": "", "licence": "see package copyright"}


# --------------------------------------------------------------------------------------
# Stamp selection
# --------------------------------------------------------------------------------------
def photo_cutout(path: Path) -> tuple[bool, str]:
    """Heuristic: keep raster stamps that are photographic cut-outs with real alpha."""
    if path.stem.endswith("_mirror"):
        return False, "mirror"
    if path.with_suffix(".svg").exists():
        return False, "has svg (vector drawing)"
    im = Image.open(path)
    if im.mode in ("L", "LA", "1"):
        return False, "greyscale drawing"
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if not has_alpha:
        return False, "no alpha"
    a = np.asarray(im.convert("RGBA"))
    alpha = a[..., 3]
    if (alpha < 16).mean() < 0.05:
        return False, "alpha not used"
    rgb = a[..., :3][alpha > 200].astype(np.int32) // 8
    if len(rgb) < 500:
        return False, "too small"
    key = rgb[:, 0] * 1024 + rgb[:, 1] * 32 + rgb[:, 2]
    _, counts = np.unique(key, return_counts=True)
    counts = np.sort(counts)[::-1]
    if len(counts) < 40 or counts[:8].sum() / counts.sum() > 0.75:
        return False, "flat colours (drawing)"
    return True, ""


def stamp_title(png: Path) -> str:
    txt = png.with_suffix(".txt")
    if txt.exists():
        first = txt.read_text(errors="replace").splitlines()
        if first:
            return first[0].strip()
    return png.stem


def find_stamps(stamps_root: Path, cls: str) -> tuple[list[dict], list[str]]:
    stamps, skipped = [], []
    for d in CLASSES[cls]:
        base = stamps_root / d
        if not base.is_dir():
            raise SystemExit(f"stamp folder missing: {base}")
        for png in sorted(base.rglob("*.png")):
            rel = png.relative_to(base)
            if any(part in SKIP_SUBDIRS for part in rel.parts[:-1]):
                continue
            ok, why = photo_cutout(png)
            if not ok:
                skipped.append(f"{png.relative_to(stamps_root)} ({why})")
                continue
            stamps.append({"path": png, "src": str(png.relative_to(stamps_root)), "title": stamp_title(png)})
    # unique, filesystem-safe stamp names within the class
    seen: dict[str, int] = {}
    for s in stamps:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", s["path"].stem).strip("-").lower() or "stamp"
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 1
        s["name"] = name
    return stamps, skipped


# --------------------------------------------------------------------------------------
# Compositing
# --------------------------------------------------------------------------------------
def load_background(path: Path, max_side: int = 1280) -> Image.Image:
    im = Image.open(path)
    im.draft("RGB", (max_side, max_side))  # fast JPEG DCT downscale
    im = ImageOps.exif_transpose(im).convert("RGB")
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
    return im


def premultiplied_transform(obj: Image.Image, fn) -> Image.Image:
    """Apply a resampling transform on premultiplied RGBA (no dark/colour fringes)."""
    a = np.asarray(obj, dtype=np.float32) / 255.0
    a[..., :3] *= a[..., 3:4]
    pm = Image.fromarray(np.round(a * 255).astype(np.uint8), "RGBA")
    pm = fn(pm)
    b = np.asarray(pm, dtype=np.float32) / 255.0
    alpha = b[..., 3:4]
    b[..., :3] = np.where(alpha > 1e-3, b[..., :3] / np.maximum(alpha, 1e-3), 0.0)
    return Image.fromarray(np.round(np.clip(b, 0, 1) * 255).astype(np.uint8), "RGBA")


def composite(obj_src: Image.Image, backgrounds: list[Image.Image], W: int, H: int,
              rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    frame = background_view(backgrounds, W, H, rng)
    paste_object(frame, obj_src, rng)
    return camera(frame, rng, nrng)


def background_view(backgrounds: list[Image.Image], W: int, H: int, rng: random.Random) -> Image.Image:
    """A random 4:3 (W:H) crop of one background, 35-100% of the largest possible, maybe mirrored."""
    bg = backgrounds[rng.randrange(len(backgrounds))]
    aspect = W / H
    cw_max = min(bg.width, bg.height * aspect)
    cw = cw_max * rng.uniform(0.35, 1.0)
    ch = cw / aspect
    x0 = rng.uniform(0, bg.width - cw)
    y0 = rng.uniform(0, bg.height - ch)
    frame = bg.resize((W, H), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        frame = ImageOps.mirror(frame)
    return frame


def paste_object(frame: Image.Image, obj_src: Image.Image, rng: random.Random) -> None:
    """Paste the stamp: tight crop, maybe mirrored, rotate +-25 deg, 35-75% of the frame's height."""
    W, H = frame.size
    obj = obj_src.crop(obj_src.getbbox())
    # erode alpha by 1 source pixel: removes the light matte fringe many small stamps have
    r, g, b, a = obj.split()
    obj = Image.merge("RGBA", (r, g, b, a.filter(ImageFilter.MinFilter(3))))
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    angle = rng.uniform(-25.0, 25.0)
    obj = premultiplied_transform(obj, lambda im: im.rotate(angle, Image.BICUBIC, expand=True))
    obj = obj.crop(obj.getbbox())
    target_h = rng.uniform(0.35, 0.75) * H
    scale = min(target_h / obj.height, 0.95 * W / obj.width)
    size = (max(1, round(obj.width * scale)), max(1, round(obj.height * scale)))
    obj = premultiplied_transform(obj, lambda im: im.resize(size, Image.LANCZOS))
    # soften the cut-out edge a little (binary-alpha stamps otherwise look pasted)
    r, g, b, a = obj.split()
    a = a.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9)))
    obj = Image.merge("RGBA", (r, g, b, a))
    px = rng.randint(0, W - obj.width)
    py = rng.randint(0, H - obj.height)
    frame.paste(obj, (px, py), obj)


def camera(frame: Image.Image, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    """Exposure/contrast jitter +-20%, slight defocus sometimes, sensor noise."""
    frame = ImageEnhance.Brightness(frame).enhance(rng.uniform(0.8, 1.2))
    frame = ImageEnhance.Contrast(frame).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.35:
        frame = frame.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    arr = np.asarray(frame, dtype=np.float32)
    arr += nrng.normal(0.0, rng.uniform(1.0, 3.5), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")


def fetch_sources(cache: Path) -> tuple[dict, dict, dict]:
    """Fetch and extract the pinned .debs: (provenance per package, extracted root, copyright stanzas)."""
    sources, roots, stanzas = {}, {}, {}
    for pkg, meta in PACKAGES.items():
        deb = fetch_deb(pkg, cache)
        digest = sha256_file(deb)
        if digest != meta["sha256"]:
            log(f"[fetch] WARNING: {deb.name} sha256 {digest} differs from the reference; "
                "images will not match the reference build")
        ver = deb.name.split("_")[1].replace("%3a", ":")
        root = cache / "extract" / f"{pkg}_{ver}_{digest[:12]}"
        extract_deb(deb, root, meta["keep"])
        roots[pkg] = root
        cps = sorted(root.glob("usr/share/doc/*/copyright"))
        stanzas[pkg] = parse_copyright(cps[0]) if cps else []
        sources[pkg] = {"version": ver, "deb": deb.name, "sha256": digest,
                        "licence": meta["licence"], "role": meta["role"]}
    return sources, roots, stanzas


def background_files(roots: dict, stanzas: dict) -> tuple[list[Path], list[dict]]:
    """The background photos named in BACKGROUNDS, with their licences."""
    bg_files, bg_info = [], []
    for pkg, names in BACKGROUNDS.items():
        found = {p.name: p for p in roots[pkg].rglob("*.jpg")}
        for n in names:
            if n not in found:
                raise SystemExit(f"background {n} not found in {pkg}")
            bg_files.append(found[n])
            bg_info.append({"file": n, "package": pkg, **file_licence(stanzas[pkg], n)})
    return bg_files, bg_info


def image_seed(seed: int, cls: str, stamp: str, k: int) -> int:
    d = hashlib.sha256(f"graft-kiosk/{seed}/{cls}/{stamp}/{k}".encode()).digest()
    return int.from_bytes(d[:8], "little")


# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="target/graft-data/kiosk", help="output folder (default %(default)s)")
    ap.add_argument("--classes", default=",".join(CLASSES),
                    help="comma-separated subset of: " + ",".join(CLASSES) + " (default: all)")
    ap.add_argument("--per-stamp", type=int, default=2, help="images per stamp (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where .debs are cached (default %(default)s)")
    ap.add_argument("--size", default="320x240", help="output WxH (default %(default)s)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if MANIFEST.json matches; "
                    "allow replacing a non-empty OUT that has no MANIFEST.json")
    args = ap.parse_args(argv)

    t0 = time.time()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes:
        ap.error(f"unknown class(es) {bad}; choose from {','.join(CLASSES)}")
    if len(set(classes)) != len(classes):
        ap.error("duplicate class")
    m = re.fullmatch(r"(\d+)x(\d+)", args.size)
    if not m:
        ap.error("--size must look like 320x240")
    W, H = int(m.group(1)), int(m.group(2))
    if args.per_stamp < 1 or W < 32 or H < 32:
        ap.error("--per-stamp must be >= 1 and --size at least 32x32")

    out = Path(args.out)
    params = {
        "script_version": SCRIPT_VERSION,
        "script_sha256": sha256_file(Path(__file__)),  # any edit of the recipe invalidates outputs
        "classes": classes,
        "per_stamp": args.per_stamp,
        "seed": args.seed,
        "size": [W, H],
        "jpeg_quality": args.quality,
        "packages": {p: PACKAGES[p]["version"] for p in PACKAGES},
    }
    manifest_path = out / "MANIFEST.json"
    if manifest_path.exists() and not args.force:
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("params") == params:
            log(f"{out}: up to date (MANIFEST.json matches), nothing to do")
            return 0
    if out.exists() and any(out.iterdir()) and not manifest_path.exists() and not args.force:
        raise SystemExit(f"{out} exists, is not empty and has no MANIFEST.json; refusing (use --force)")

    sources, roots, stanzas = fetch_sources(Path(args.cache).expanduser())
    bg_files, bg_info = background_files(roots, stanzas)
    log(f"[bg] loading {len(bg_files)} background photos")
    backgrounds = [load_background(p) for p in bg_files]

    stamps_root = roots["tuxpaint-stamps-default"] / STAMPS_ROOT
    tmp_out = out.with_name(out.name + ".partial")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)

    counts, stamp_lists, skipped_all = {}, {}, {}
    for cls in classes:
        stamps, skipped = find_stamps(stamps_root, cls)
        skipped_all[cls] = skipped
        (tmp_out / cls).mkdir()
        n = 0
        for s in stamps:
            src = Image.open(s["path"]).convert("RGBA")
            for k in range(args.per_stamp):
                sd = image_seed(args.seed, cls, s["name"], k)
                rng = random.Random(sd)
                nrng = np.random.Generator(np.random.PCG64(sd))
                img = composite(src, backgrounds, W, H, rng, nrng)
                img.save(tmp_out / cls / f"{s['name']}_{k}.jpg", "JPEG", quality=args.quality,
                         optimize=False, progressive=False)
                n += 1
        counts[cls] = n
        stamp_lists[cls] = [{"name": s["name"], "title": s["title"], "source": s["src"]} for s in stamps]
        log(f"[gen] {cls:12s} {len(stamps):3d} stamps -> {n} images ({len(skipped)} skipped)")

    manifest = {
        "description": "Kiosk-camera-like composites: tuxpaint photo stamps pasted on background photos. "
                       "ImageFolder layout OUT/<class>/<stamp>_<k>.jpg; group splits by <stamp>.",
        "params": params,
        "classes": classes,
        "roles": {r: [c for c in cs if c in classes] for r, cs in ROLES.items()},
        "counts": counts,
        "stamps_per_class": {c: len(stamp_lists[c]) for c in classes},
        "total_images": sum(counts.values()),
        "seed": args.seed,
        "image_size": [W, H],
        "generator": {"python": sys.version.split()[0], "pillow": Image.__version__, "numpy": np.__version__},
        "sources": sources,
        "backgrounds": bg_info,
        "stamps": stamp_lists,
        "skipped_stamps": skipped_all,
        "licence_note": "Generated images are derived from GPL-2 (tuxpaint stamps), GPL-2+ and "
                        "CC-BY/CC-BY-SA (backgrounds) works; generate locally, do not commit.",
    }
    (tmp_out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)
    log(f"[done] {manifest['total_images']} images in {out} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

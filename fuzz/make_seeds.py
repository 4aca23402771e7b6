#!/usr/bin/env python3
"""Re-create the fuzzers' seed corpus, fuzz/corpus/<target>/ (run once; the files are committed).

Standard library only. Every seed is made from a file of the repository or written here byte by
byte, so the corpus says where it came from:

  protocol     the request lines of docs/PROTOCOL.md's example session, one per file, the whole
               session as one stream, and one line per verb form the session lacks
  headfile     tests/fixtures/heads/*.graft without their trailing sha256 (the target seals what
               it is given, see fuzz_targets/headfile.rs), and the centroid fixture cut down to
               8 values per embedding as each head kind, as format 2 (power 0.5), and
               behind a small top block (format 3) and one block deeper (format 4)
  manifest     models/*.toml
  export_meta  the graft.* metadata of `graft export` outputs given on the command line, as
               `key=value` lines and as a ModelProto holding only that metadata (field 14)
  image        tiny pictures in every format the decoder takes: PNG (RGB, grey, RGBA, 16-bit,
               palette + tRNS), BMP (24-bit, 8-bit palette), GIF, TIFF, lossless WebP, and the
               MJPEG test frames of tests/fixtures/frames/ (one with an EXIF orientation added)

  cargo build -p graft-cli
  for k in centroid logistic; do
      target/debug/graft export --head tests/fixtures/heads/release-42bf848-$k.graft --out /tmp/$k.onnx
  done
  target/debug/graft export --logits --head tests/fixtures/heads/release-42bf848-logistic.graft \\
      --out /tmp/logits.onnx
  python3 fuzz/make_seeds.py /tmp/centroid.onnx /tmp/logistic.onnx /tmp/logits.onnx

Without .onnx arguments the export_meta seeds are left as they are.
"""
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def out(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# ---------------------------------------------------------------- protocol

def protocol():
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text()
    session = [l[2:] for l in doc.splitlines() if l.startswith("> ")]
    assert session, "docs/PROTOCOL.md has no example session"
    for i, line in enumerate(session):
        out("protocol", f"session-{i:02}", line)
    out("protocol", "session-stream", "".join(l + "\r\n" for l in session))

    def sealed(line):
        x = 0
        for b in line.encode():
            x ^= b
        return f"{line}*{x:02X}"

    extra = [
        "HELP", "SAVE", "TRAIN", "FORGET birds", "LEARN ça 100", "THRESHOLD", "THRESHOLD 1e-3",
        "STREAM ON 500", "stream off", "RESET a1B2-c_3", "AUTH", "AUTH " + "0123456789abcdef" * 4,
        "#abcdefghijklmnop PING", sealed("#7 INFO"), sealed("LEARN cup 3"),
    ]
    for i, line in enumerate(extra):
        out("protocol", f"extra-{i:02}", line)


# ---------------------------------------------------------------- headfile

MAGIC = b"GRAFT-HEAD\n"


def split_head(b):
    n = struct.unpack("<I", b[11:15])[0]
    header = json.loads(b[15:15 + n])
    data = b[15 + n:-32]
    return header, data


def head_bytes(header, data):
    js = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(js)) + js + data  # unsealed: the target appends the sha256


def headfile():
    heads = sorted((ROOT / "tests" / "fixtures" / "heads").glob("*.graft"))
    for p in heads:
        out("headfile", p.stem, p.read_bytes()[:-32])
    header, data = split_head((ROOT / "tests/fixtures/heads/release-42bf848-centroid.graft").read_bytes())
    dim, small = header["backbone"]["dim"], 8
    rows = [data[i * dim * 4:(i + 1) * dim * 4] for i in range(len(header["examples"]))]
    data8 = b"".join(r[:small * 4] for r in rows)
    header["backbone"]["dim"] = small
    for kind in ["centroid", "knn", "bayes", "logistic"]:
        h = dict(header, kind=kind)
        if kind == "logistic":
            h["linear_weights"] = [round(0.01 * (i % 7) - 0.03, 4) for i in range(2 * small)]
            h["linear_bias"] = [0.1, -0.1]
        out("headfile", f"dim8-{kind}", head_bytes(h, data8))
    h = dict(header, format=2, kind="knn", params=dict(header["params"], power=0.5, knn_k=3))
    out("headfile", "dim8-format2-power", head_bytes(h, data8))
    # Behind a top block (format 3) and one block deeper (format 4): the 8 values are 2
    # channels on a 2x2 map; the blocks' numbers follow the embeddings.
    def floats(n, k):
        return struct.pack(f"<{n}f", *[round(0.1 * ((i * k) % 9) - 0.4, 2) for i in range(n)])

    power = header["params"].get("power", 1.0)
    top = dict(node='Conv "top"', cin=2, cout=3, positions=4, clip_lo=0.0, clip_hi=6.0,
               gem_power=3.0, power=power)
    h = dict(header, format=3, kind="centroid", top_block=top)
    out("headfile", "dim8-format3-top", head_bytes(h, data8 + floats(9, 5)))
    pre = dict(node='Conv "expand"', cin=2, hidden=3, cout=2, side=2, kernel=3,
               expand_clip=[0.0, 6.0], depthwise_clip=[0.0, 6.0], project_clip=[None, None],
               reads=["a", "b", "c", "d"])
    h = dict(header, format=4, kind="centroid", top_block=dict(top, pre=pre))
    # top 3x2 + 3; expand 3x2 + 3, depthwise 3x3x3 + 3, project 2x3 + 2
    out("headfile", "dim8-format4-deep", head_bytes(h, data8 + floats(9, 5) + floats(47, 7)))


# ---------------------------------------------------------------- manifest

def manifest():
    for p in sorted((ROOT / "models").glob("*.toml")):
        out("manifest", p.stem, p.read_bytes())


# ---------------------------------------------------------------- export_meta

def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n:
            return bytes(b)


def read_varint(b, i):
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return n, i


def fields(b):
    """Top-level protobuf fields: (number, wire type, value bytes or int)."""
    i = 0
    while i < len(b):
        key, i = read_varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(b, i)
        elif wt == 2:
            n, i = read_varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, v


def export_meta(onnx_files):
    for path in onnx_files:
        b = Path(path).read_bytes()
        props = []
        for num, wt, v in fields(b):
            if num == 14 and wt == 2:  # ModelProto.metadata_props
                kv = {n: x.decode() for n, _, x in fields(v)}
                props.append((kv.get(1, ""), kv.get(2, "")))
        graft = [(k, v) for k, v in props if k.startswith("graft.")]
        assert graft, f"{path} has no graft metadata"
        stem = Path(path).stem
        out("export_meta", f"{stem}.txt", "".join(f"{k}={v}\n" for k, v in graft))
        proto = b""
        for k, v in graft:
            entry = b"\x0a" + varint(len(k.encode())) + k.encode() + b"\x12" + varint(len(v.encode())) + v.encode()
            proto += b"\x72" + varint(len(entry)) + entry  # field 14, length-delimited
        out("export_meta", f"{stem}.pb", proto)


# ---------------------------------------------------------------- image

W, H = 8, 6


def pixels():
    return [((x * 32) & 255, (y * 40) & 255, ((x + y) * 20) & 255) for y in range(H) for x in range(W)]


def png(color_type, depth, rows, extra=b""):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", W, H, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def lzw(indices, min_size):
    clear, eoi = 1 << min_size, (1 << min_size) + 1
    table = {(i,): i for i in range(clear)}
    nxt, width = eoi + 1, min_size + 1
    bits, nbits, outb = 0, 0, bytearray()

    def emit(code):
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            outb.append(bits & 255)
            bits >>= 8
            nbits -= 8

    emit(clear)
    cur = ()
    for p in indices:
        if cur + (p,) in table:
            cur += (p,)
            continue
        emit(table[cur])
        if nxt < 4096:
            table[cur + (p,)] = nxt
            nxt += 1
            if nxt > (1 << width) and width < 12:
                width += 1
        cur = (p,)
    emit(table[cur])
    emit(eoi)
    if nbits:
        outb.append(bits & 255)
    return bytes(outb)


def gif():
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    idx = [(x + y) % 4 for y in range(H) for x in range(W)]
    data = lzw(idx, 2)
    blocks = b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255))
    return (b"GIF89a" + struct.pack("<HHBBB", W, H, 0xF1, 0, 0) + b"".join(bytes(c) for c in palette)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, W, H, 0) + b"\x02" + blocks + b"\x00\x3b")


def bmp24():
    row = lambda y: b"".join(bytes((b, g, r)) for r, g, b in pixels()[y * W:(y + 1) * W])
    stride = (W * 3 + 3) & ~3
    body = b"".join(row(y).ljust(stride, b"\0") for y in reversed(range(H)))
    info = struct.pack("<IiiHHIIiiII", 40, W, H, 1, 24, 0, len(body), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(body), 0, 0, 54) + info + body


def bmp8():
    palette = b"".join(bytes((i * 60 & 255, i * 30 & 255, i * 90 & 255, 0)) for i in range(4))
    stride = (W + 3) & ~3
    body = b"".join(bytes((x + y) % 4 for x in range(W)).ljust(stride, b"\0") for y in reversed(range(H)))
    info = struct.pack("<IiiHHIIiiII", 40, W, H, 1, 8, 0, len(body), 2835, 2835, 4, 0)
    off = 14 + 40 + len(palette)
    return b"BM" + struct.pack("<IHHI", off + len(body), 0, 0, off) + info + palette + body


def tiff():
    data = b"".join(bytes(p) for p in pixels())
    n = 9
    ifd_at = 8
    bps_at = ifd_at + 2 + n * 12 + 4
    data_at = bps_at + 6
    tags = [
        (256, 3, 1, W), (257, 3, 1, H), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, data_at), (277, 3, 1, 3), (278, 3, 1, H), (279, 4, 1, len(data)),
    ]
    ifd = struct.pack("<H", n)
    for tag, typ, count, value in tags:
        v = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + v
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + struct.pack("<HHH", 8, 8, 8) + data


def webp_lossless(argb=(255, 200, 100, 50)):
    """A solid-colour VP8L picture: every prefix code a one-symbol simple code (0 bits a pixel)."""
    a, r, g, b = argb
    bits, n = 0, 0

    def put(v, k):
        nonlocal bits, n
        bits |= v << n
        n += k

    put(W - 1, 14)
    put(H - 1, 14)
    put(0, 1)  # alpha unused
    put(0, 3)  # version
    put(0, 1)  # no transform
    put(0, 1)  # no colour cache
    put(0, 1)  # no meta prefix codes
    for sym in (g, r, b, a, 0):  # green, red, blue, alpha, distance
        put(1, 1)  # simple code
        put(0, 1)  # one symbol
        put(1, 1)  # 8-bit symbol
        put(sym, 8)
    payload = b"\x2f" + bits.to_bytes((n + 7) // 8, "little")
    if len(payload) % 2:
        payload_padded = payload + b"\0"
    else:
        payload_padded = payload
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload_padded
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_with_exif(jpeg, orientation=6):
    tiffh = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiffh += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiffh
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def image():
    px = pixels()
    out("image", "rgb8.png", png(2, 8, [bytes(c for p in px[y * W:(y + 1) * W] for c in p) for y in range(H)]))
    out("image", "grey8.png", png(0, 8, [bytes(p[0] for p in px[y * W:(y + 1) * W]) for y in range(H)]))
    out("image", "rgba8.png", png(6, 8, [bytes(c for x, p in enumerate(px[y * W:(y + 1) * W]) for c in p + (x * 30,))
                                          for y in range(H)]))
    out("image", "rgb16.png", png(2, 16, [b"".join(struct.pack(">H", c * 257) for p in px[y * W:(y + 1) * W] for c in p)
                                           for y in range(H)]))
    plte = struct.pack(">I", 12) + b"PLTE" + bytes(range(12))
    plte += struct.pack(">I", zlib.crc32(b"PLTE" + bytes(range(12))) & 0xFFFFFFFF)
    trns = struct.pack(">I", 2) + b"tRNS" + b"\x00\x80" + struct.pack(">I", zlib.crc32(b"tRNS\x00\x80") & 0xFFFFFFFF)
    out("image", "palette.png", png(3, 8, [bytes((x + y) % 4 for x in range(W)) for y in range(H)], plte + trns))
    out("image", "rgb24.bmp", bmp24())
    out("image", "palette8.bmp", bmp8())
    out("image", "palette.gif", gif())
    out("image", "rgb8.tiff", tiff())
    out("image", "solid-lossless.webp", webp_lossless())
    frames = ROOT / "tests" / "fixtures" / "frames"
    for name in ["mjpeg_64x32.jpg", "mjpeg444_64x32.jpg"]:
        out("image", name, (frames / name).read_bytes())
    out("image", "mjpeg_64x32_exif6.jpg", jpeg_with_exif((frames / "mjpeg_64x32.jpg").read_bytes()))


def main():
    protocol()
    headfile()
    manifest()
    if sys.argv[1:]:
        export_meta(sys.argv[1:])
    image()
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"corpus: {sum(1 for p in CORPUS.rglob('*') if p.is_file())} files, {total} bytes")
    assert total < 2_000_000, "keep the seed corpus under 2 MB"
    for target in sorted(p.name for p in CORPUS.iterdir()):
        h = hashlib.sha256()
        for p in sorted((CORPUS / target).iterdir()):
            h.update(p.name.encode() + p.read_bytes())
        print(f"  {target}: {h.hexdigest()[:16]}")


if __name__ == "__main__":
    main()

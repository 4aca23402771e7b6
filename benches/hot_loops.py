#!/usr/bin/env python3
"""Checks that graft's compiled kernels keep their accumulators in registers.

A tile of the 1x1 kernel holds its sums in vector registers across the loop over input
channels. If the compiler cannot keep them there (it happened: a rolled store loop in the
epilogue made it keep all 24 in memory), every multiply-add is followed by a store of its
register to the stack, and the kernel runs at half speed with the very same results: no test
of values can see it. This script disassembles a release binary, finds the innermost loops of
graft's kernels (from a backward branch's target to the last branch back to it, holding no
other loop) that do at least MIN_FMAS vector multiply-adds, and fails if any of them stores a
vector register to the stack.

    python3 benches/hot_loops.py target/release/graft
    python3 benches/hot_loops.py target/aarch64-unknown-linux-gnu/release/graft

The architecture is read from the binary (x86_64, aarch64 or 32-bit ARM); the matching objdump
(`objdump`, `aarch64-linux-gnu-objdump`, `arm-linux-gnueabihf-objdump`) must be installed.
Exit status 0: every hot loop keeps its vectors in registers; 1: one or more do not (each is
printed); 2: the binary could not be read, or no hot loop was found at all.
"""

import re
import subprocess
import sys

# Multiply-adds an innermost loop must have to count as a kernel's hot loop: the smallest tile
# of the 1x1 kernel that matters does 6 rows x 2 vectors per input channel.
MIN_FMAS = 12

ARCHES = {
    # ELF e_machine: (objdump, the functions that hold graft's vector kernels (their generic
    # bodies are inlined into the per-instruction-set entry points of `backbone::simd`), the
    # multiply-add mnemonics, a vector register stored to the stack)
    62: (
        "objdump",
        # AVX-512 only: its 32 registers hold every tile; AVX2's 16 do not always (its 6 x 2
        # tiles with one more position spill a little, and the depthwise's wider groups too).
        re.compile(r"graft::backbone::simd::x86::avx512"),
        re.compile(r"^(vfn?m(add|sub)(132|213|231)p[sd]|vpdpbusds?)$"),
        # vmovups %zmm3,0x40(%rsp) / vmovaps %ymm1,(%rsp,%rax,1)
        re.compile(r"^vmov(u|a)p[sd]\s+%[xyz]mm\d+,\s*[^,]*\(%rsp"),
    ),
    183: (
        "aarch64-linux-gnu-objdump",
        re.compile(r"graft.*backbone"),
        re.compile(r"^(fml[as]|[su]dot)$"),
        # str q0, [sp, #32] / stp q0, q1, [sp, #64]
        re.compile(r"^(str|stur|stp)\s+q\d+.*\[sp"),
    ),
    40: (
        "arm-linux-gnueabihf-objdump",
        re.compile(r"graft.*backbone"),
        re.compile(r"^(vmla|vfma|vmls|vfms)\.f32$"),
        # vstr d8, [sp, #16] / vstmia sp, {d0-d3} / vst1.32 {d0}, [sp]
        re.compile(r"^(vstr\s+d\d+,\s*\[sp|vstm\w*\s+sp|vst1\.\d+\s+\{[^}]*\},\s*\[sp)"),
    ),
}

LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
BRANCH_TARGET = re.compile(r"\b([0-9a-f]+)\s+<")


def machine(path):
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF binary")
    little = head[5] == 1
    return int.from_bytes(head[18:20], "little" if little else "big")


def functions(objdump, kernels, path):
    """Yields (name, [(address, mnemonic, operands)]) for the functions `kernels` matches."""
    out = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name, body = None, []
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            if name is not None and kernels.search(name):
                yield name, body
            name, body = m.group(2), []
            continue
        m = LINE.match(line)
        if m and name is not None:
            body.append((int(m.group(1), 16), m.group(2), m.group(3)))
    if name is not None and kernels.search(name):
        yield name, body


def innermost_loops(body):
    """(start, end) index ranges of the innermost loops: each loop runs from its header (the
    target of a backward branch) to the last branch back to it (a loop may branch back from
    more than one place: its fast path and the detour around a call), and holds no other."""
    index = {addr: i for i, (addr, _, _) in enumerate(body)}
    ends = {}
    for i, (addr, mnemonic, operands) in enumerate(body):
        # x86 `j*`; Arm `b`, `b.ne`, `bne`, `cbz`, `cbnz`, `tbz`, `tbnz` (a call's target lies
        # outside the function, so it is never taken for a loop).
        if not mnemonic.startswith(("j", "b", "cb", "tb")):
            continue
        m = BRANCH_TARGET.search(operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            ends[index[target]] = max(ends.get(index[target], i), i)
    loops = sorted(ends.items())
    return [
        (s, e)
        for (s, e) in loops
        if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for (s2, e2) in loops)
    ]


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: hot_loops.py BINARY", file=sys.stderr)
        return 2
    path = sys.argv[1]
    try:
        objdump, kernels, fma, spill = ARCHES[machine(path)]
    except (OSError, ValueError, KeyError) as e:
        print(f"hot_loops: cannot check {path}: {e}", file=sys.stderr)
        return 2
    hot, bad = 0, []
    for name, body in functions(objdump, kernels, path):
        for s, e in innermost_loops(body):
            loop = body[s : e + 1]
            fmas = sum(1 for _, mn, _ in loop if fma.match(mn))
            if fmas < MIN_FMAS:
                continue
            hot += 1
            stores = [f"{mn} {ops}" for _, mn, ops in loop if spill.match(f"{mn} {ops}")]
            if stores:
                bad.append((name, loop[0][0], fmas, stores))
    if hot == 0:
        print(f"hot_loops: no loop of {MIN_FMAS}+ multiply-adds in {path}", file=sys.stderr)
        return 2
    for name, addr, fmas, stores in bad:
        print(
            f"hot_loops: {name} at {addr:#x}: {fmas} multiply-adds, "
            f"{len(stores)} vector stores to the stack, e.g. {stores[0]}"
        )
    print(f"hot_loops: {path}: {hot} hot loops, {len(bad)} keep vectors on the stack")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

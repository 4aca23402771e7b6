// graft's GPU kernels: the four kernels of src/gpu/lower.rs, one shader module.
//
// Layout: every tensor is f32, NCHW, images one after another (`n` of them). One bind group
// for every kernel: the step's parameters, its input, the weights buffer (all weights and
// biases of the model; a step reads from its offsets), its output and a residual input.
// Every output value goes through `epilogue`: bias → clip → fake-quant → + residual → clip →
// fake-quant, each stage switched by a bit of `flags`.

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, sh: u32, sw: u32, pt: u32,
    pl: u32, dh: u32, dw: u32, group_in: u32,
    group_out: u32, w_off: u32, b_off: u32, flags: u32,
    clip_lo: f32, clip_hi: f32, total: u32, len: u32,
    q1_s: f32, q1_zp: f32, q1_ds: f32, q1_dzp: f32,
    q1_min: f32, q1_max: f32, q2_s: f32, q2_zp: f32,
    q2_ds: f32, q2_dzp: f32, q2_min: f32, q2_max: f32,
    clip2_lo: f32, clip2_hi: f32, power: u32, pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> res: array<f32>;

const BIAS: u32 = 1u;
const CLIP: u32 = 2u;
const Q1: u32 = 4u;
const RESIDUAL: u32 = 8u;
const Q2: u32 = 16u;
const CLIP2: u32 = 32u;

// ONNX QuantizeLinear then DequantizeLinear, in float. WGSL's round() is half-to-even, as
// ONNX requires.
fn fake_quant(v: f32, s: f32, zp: f32, ds: f32, dzp: f32, lo: f32, hi: f32) -> f32 {
    let q = clamp(round(v / s) + zp, lo, hi);
    return (q - dzp) * ds;
}

fn epilogue(acc: f32, channel: u32, idx: u32) -> f32 {
    var v = acc;
    if ((p.flags & BIAS) != 0u) {
        v = v + wt[p.b_off + channel];
    }
    if ((p.flags & CLIP) != 0u) {
        v = clamp(v, p.clip_lo, p.clip_hi);
    }
    if ((p.flags & Q1) != 0u) {
        v = fake_quant(v, p.q1_s, p.q1_zp, p.q1_ds, p.q1_dzp, p.q1_min, p.q1_max);
    }
    if ((p.flags & RESIDUAL) != 0u) {
        v = v + res[idx];
    }
    if ((p.flags & CLIP2) != 0u) {
        v = clamp(v, p.clip2_lo, p.clip2_hi);
    }
    if ((p.flags & Q2) != 0u) {
        v = fake_quant(v, p.q2_s, p.q2_zp, p.q2_ds, p.q2_dzp, p.q2_min, p.q2_max);
    }
    return v;
}

// One-thread-per-output kernels are dispatched as a 2-D grid of 256-thread workgroups (a
// batch of large maps has more than 65 535 workgroups); this is the flat index.
fn flat(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

// Direct convolution, any group count (depthwise: group_in = 1): one output per thread.
@compute @workgroup_size(256)
fn conv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = flat(gid, nw);
    if (idx >= p.total) {
        return;
    }
    let ox = idx % p.ow;
    let t = idx / p.ow;
    let oy = t % p.oh;
    let t2 = t / p.oh;
    let oc = t2 % p.c_out;
    let n = t2 / p.c_out;
    let ic0 = (oc / p.group_out) * p.group_in;
    let iy0 = i32(oy * p.sh) - i32(p.pt);
    let ix0 = i32(ox * p.sw) - i32(p.pl);
    var acc = 0.0;
    for (var ic = 0u; ic < p.group_in; ic++) {
        let plane = (n * p.c_in + ic0 + ic) * p.h;
        let wbase = p.w_off + (oc * p.group_in + ic) * p.kh * p.kw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = iy0 + i32(ky * p.dh);
            if (iy < 0 || iy >= i32(p.h)) {
                continue;
            }
            let row = (plane + u32(iy)) * p.w;
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = ix0 + i32(kx * p.dw);
                if (ix < 0 || ix >= i32(p.w)) {
                    continue;
                }
                acc = acc + x[row + u32(ix)] * wt[wbase + ky * p.kw + kx];
            }
        }
    }
    y[idx] = epilogue(acc, oc, idx);
}

// out[n, m, q] = Σ_k W[m, k] · x[n, k, q]: M = c_out, K = c_in, Q = oh·ow pixels (1 for a
// fully connected layer). The columns of all images are one axis of n·Q. A 16×16 workgroup
// computes a 64×64 tile, each thread 4×4 values strided by 16, K in steps of 16 through
// workgroup memory.
// acc += a ⊗ b: a thread's 4×4 block of the product, one k at a time.
fn outer4(acc: ptr<function, array<f32, 16>>, a: array<f32, 4>, b: array<f32, 4>) {
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            (*acc)[i * 4u + j] = (*acc)[i * 4u + j] + a[i] * b[j];
        }
    }
}

// Writes a thread's 4×4 values of the 64×64 tile at (m0, j0) through the epilogue.
fn store_tile(acc: array<f32, 16>, m0: u32, j0: u32, lid: vec3<u32>) {
    let m_all = p.c_out;
    let q_all = p.oh * p.ow;
    let cols = p.n * q_all;
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + lid.y + 16u * i;
        if (m >= m_all) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = j0 + lid.x + 16u * j;
            if (col >= cols) {
                continue;
            }
            let idx = ((col / q_all) * m_all + m) * q_all + col % q_all;
            y[idx] = epilogue(acc[i * 4u + j], m, idx);
        }
    }
}

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> tile_a: array<f32, 1024>; // [TK][TM]
var<workgroup> tile_b: array<f32, 1024>; // [TK][TN]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m_all = p.c_out;
    let k_all = p.c_in;
    let q_all = p.oh * p.ow;
    let cols = p.n * q_all;
    let m0 = wg.y * TM;
    let j0 = wg.x * TN;
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, 16>; // function-scope variables start at zero
    for (var k0 = 0u; k0 < k_all; k0 += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = tid + i * 256u;
            let mm = e / TK;
            let kk = e % TK;
            var v = 0.0;
            if (m0 + mm < m_all && k0 + kk < k_all) {
                v = wt[p.w_off + (m0 + mm) * k_all + k0 + kk];
            }
            tile_a[kk * TM + mm] = v;
        }
        for (var i = 0u; i < 4u; i++) {
            let e = tid + i * 256u;
            let kk = e / TN;
            let jj = e % TN;
            let j = j0 + jj;
            var v = 0.0;
            if (j < cols && k0 + kk < k_all) {
                let n = j / q_all;
                v = x[(n * k_all + k0 + kk) * q_all + j % q_all];
            }
            tile_b[kk * TN + jj] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = tile_a[kk * TM + lid.y + 16u * i];
                b[i] = tile_b[kk * TN + lid.x + 16u * i];
            }
            outer4(&acc, a, b);
        }
        workgroupBarrier();
    }
    store_tile(acc, m0, j0, lid);
}

// Global average pool: one (image, channel) per thread, `len` = H·W values. With `power`
// k > 1 it is the generalised mean (mean(max(x, 0)^k))^(1/k) (GeM pooling): the power by
// repeated products, so 0 stays exactly 0.
@compute @workgroup_size(256)
fn pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = flat(gid, nw);
    if (idx >= p.total) {
        return;
    }
    let base = idx * p.len;
    var acc = 0.0;
    if (p.power > 1u) {
        for (var i = 0u; i < p.len; i++) {
            let v = max(x[base + i], 0.0);
            var vk = v;
            for (var k = 1u; k < p.power; k++) {
                vk = vk * v;
            }
            acc = acc + vk;
        }
        let m = acc / f32(p.len);
        y[idx] = epilogue(select(0.0, pow(m, 1.0 / f32(p.power)), m > 0.0), idx % p.c_out, idx);
        return;
    }
    for (var i = 0u; i < p.len; i++) {
        acc = acc + x[base + i];
    }
    y[idx] = epilogue(acc / f32(p.len), idx % p.c_out, idx);
}

// The epilogue alone (a Clip, Add or Q/DQ pair that had no kernel to fuse into).
@compute @workgroup_size(256)
fn eltwise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let idx = flat(gid, nw);
    if (idx >= p.total) {
        return;
    }
    y[idx] = epilogue(x[idx], 0u, idx);
}

// The same product without workgroup memory or barriers: each thread reads its operands
// straight from the buffers. For software adapters (lavapipe runs a workgroup's threads as
// SIMD lanes of one CPU thread, and every barrier is a switch between them).
@compute @workgroup_size(16, 16)
fn matmul_flat(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m_all = p.c_out;
    let k_all = p.c_in;
    let q_all = p.oh * p.ow;
    let cols = p.n * q_all;
    var acc: array<f32, 16>;
    var rows: array<u32, 4>;
    var bases: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(wg.y * TM + lid.y + 16u * i, m_all - 1u);
        let col = min(wg.x * TN + lid.x + 16u * i, cols - 1u);
        bases[i] = (col / q_all) * k_all * q_all + col % q_all;
    }
    for (var k = 0u; k < k_all; k++) {
        var a: array<f32, 4>;
        var b: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            a[i] = wt[p.w_off + rows[i] * k_all + k];
            b[i] = x[bases[i] + k * q_all];
        }
        outer4(&acc, a, b);
    }
    store_tile(acc, wg.y * TM, wg.x * TN, lid);
}

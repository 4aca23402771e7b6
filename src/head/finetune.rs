//! Fine-tuning the backbone's top block beside a linear classifier (`--head finetune`): the
//! third strategy of transfer learning, on the network's last convolution.
//!
//! The examples are the top block's *input* (`--model NAME:top`: 320 channels × 49 positions
//! for EfficientNet-Lite0), so the frozen part of the network runs once per photo, as for every
//! other head. Training then updates the block's 1×1 convolution (`W`, `cout × cin`, and its
//! bias) together with a linear classifier on the pooled features:
//!
//! ```text
//! x (cin × P) ─ W·x + b ─ clip[lo, hi] ─ GeM / average pool ─ |·|^power ─ L2 ─ Wc·u + bc ─▶ logits
//! ```
//!
//! - **Low-rank update** (LoRA, Hu et al. 2021): `W = W0 + V·Uᵀ` with `U: cin × r`, `V: cout × r`
//!   (`r` = `params.finetune_rank`, 16). `W0·x` is computed once per example and kept, so an
//!   epoch costs `r`-wide products instead of the full convolution (about a tenth), and the
//!   rank is itself a brake on overfitting a few dozen photos. `V` starts at zero: epoch 0 is
//!   the pretrained block exactly.
//! - **L2-SP** (Li, Grandvalet & Davoine 2018): the penalty is on the distance to the
//!   pretrained block, `λ (‖V·Uᵀ‖² + ‖b − b0‖²)`, computed exactly through `r × r` Gram
//!   matrices; the classifier has the logistic head's L2 penalty.
//! - **Linear probe, then fine-tune** (Kumar et al. 2022): the classifier starts from the
//!   logistic head fitted on the pretrained features, so fine-tuning starts from the fixed-
//!   feature answer and early stopping can always fall back on it (0 epochs).
//! - Adam on mini-batches of 32, each batch's examples split over threads. How many epochs:
//!   chosen by grouped cross-validation ([`checkpoint_logits`], `head::finetune_cv`: early
//!   stopping), recorded in the head's params.
//!
//! The fitted model is self-contained: the merged `W`, `b`, the clip and pool, and the
//! classifier, so prediction needs nothing from the backbone but the cut activations.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::{Rng, SeedableRng};

use super::cv::{FoldPlan, Logits};
use super::fit::Inner;
use super::{softmax, HeadError, HeadKind, HeadParams};
use crate::backbone::TopBlock;

/// The epochs early stopping chooses among (0: the linear probe alone).
pub const EPOCH_CHECKPOINTS: [usize; 5] = [0, 5, 10, 20, 30];

/// The smallest value GeM and the power transform differentiate at (below: a zero gradient).
const EPS: f32 = 1e-6;

/// Pooled features of one example through `block` (its weights as given): `cout` values.
pub(crate) fn features(block: &TopBlock, raw: &[f32]) -> Vec<f32> {
    if let Some(pre) = &block.pre {
        return super::deep::features(block, pre, raw);
    }
    let x = ArrayView2::from_shape((block.cin, block.positions), raw).expect("raw is cin × P");
    let w = ArrayView2::from_shape((block.cout, block.cin), &block.weights).expect("cout × cin");
    let b = ArrayView2::from_shape((1, block.cout), &block.bias).expect("1 × cout");
    let mut z = Array2::zeros((block.positions, block.cout));
    general_mat_mul(1.0, &x.t(), &w.t(), 0.0, &mut z);
    pool_rows(block, &(z + b))
}

/// The average or GeM pool of every channel (column) of a `P × cout` map, clipped first,
/// reading it row by row (a column walk strides through memory and was a quarter of an epoch;
/// GeM's p = 3 is two multiplies, `powf` was most of the rest).
pub(crate) fn pool_rows(block: &TopBlock, z: &Array2<f32>) -> Vec<f32> {
    let (lo, hi) = block.clip;
    let mut sums = vec![0f32; z.ncols()];
    for row in z.rows() {
        let row = row.as_slice().expect("standard layout");
        match block.gem_power {
            None => sums
                .iter_mut()
                .zip(row)
                .for_each(|(s, v)| *s += v.clamp(lo, hi)),
            Some(3.0) => sums.iter_mut().zip(row).for_each(|(s, v)| {
                let v = v.clamp(lo, hi).max(0.0);
                *s += v * v * v;
            }),
            Some(p) => sums
                .iter_mut()
                .zip(row)
                .for_each(|(s, v)| *s += v.clamp(lo, hi).max(0.0).powf(p)),
        }
    }
    let n = z.nrows().max(1) as f32;
    sums.into_iter()
        .map(|s| match block.gem_power {
            None => s / n,
            Some(3.0) => (s / n).cbrt(),
            Some(p) => (s / n).powf(1.0 / p),
        })
        .collect()
}

/// `v^(p - 1)` for GeM's gradient (`v ≥ 0`), exact and fast for p = 3.
fn gem_slope(p: f32, v: f32) -> f32 {
    if p == 3.0 {
        v * v
    } else {
        v.powf(p - 1.0)
    }
}

/// The power transform and L2 normalisation of [`HeadParams::input`] on pooled features.
pub(crate) fn transform(power: f32, f: &[f32]) -> Vec<f32> {
    super::power_l2(power, f)
}

/// Features of many examples (threads over examples), transformed as the fixed heads see them.
pub(crate) fn transformed_features(
    block: &TopBlock,
    power: f32,
    raw: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    parallel_map(raw, |r| transform(power, &features(block, r)))
}

pub(crate) fn parallel_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<U>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a feature thread panicked"))
            .collect()
    })
}

/// What training sees of a set of examples: their activations (borrowed, as given) and their
/// pretrained convolution outputs, computed once and shared by every fold and epoch.
pub(crate) struct Cache<'a> {
    block: &'a TopBlock,
    /// Per example, `cin × P` (the raw layout).
    raw: &'a [Vec<f32>],
    /// Per example, `P × cout`: `x·W0ᵀ + b0` before the clip.
    z0: Vec<Array2<f32>>,
}

impl<'a> Cache<'a> {
    pub(crate) fn new(block: &'a TopBlock, raw: &'a [Vec<f32>]) -> Cache<'a> {
        let w0 = ArrayView2::from_shape((block.cout, block.cin), &block.weights).expect("cout×cin");
        let b0 = ArrayView2::from_shape((1, block.cout), &block.bias).expect("1×cout");
        let z0 = parallel_map(raw, |r| {
            let x = ArrayView2::from_shape((block.cin, block.positions), r).expect("cin × P");
            // Row-major (P × cout) whatever layout the product would pick: the epochs read it
            // row by row.
            let mut z = Array2::zeros((block.positions, block.cout));
            general_mat_mul(1.0, &x.t(), &w0.t(), 0.0, &mut z);
            z + b0
        });
        Cache { block, raw, z0 }
    }

    /// Example `i` as `P × cin` (a transposed view: one row per position).
    fn a(&self, i: usize) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((self.block.cin, self.block.positions), &self.raw[i])
            .expect("cin × P")
            .reversed_axes()
    }
}

/// Trainable state.
#[derive(Clone)]
struct Params {
    u: Array2<f32>,  // cin × r
    v: Array2<f32>,  // cout × r
    db: Array1<f32>, // cout
    wc: Array2<f32>, // classes × cout
    bc: Array1<f32>, // classes
}

impl Params {
    fn zeros_like(&self) -> Params {
        Params {
            u: Array2::zeros(self.u.raw_dim()),
            v: Array2::zeros(self.v.raw_dim()),
            db: Array1::zeros(self.db.raw_dim()),
            wc: Array2::zeros(self.wc.raw_dim()),
            bc: Array1::zeros(self.bc.raw_dim()),
        }
    }

    fn fill(&mut self, v: f32) {
        for a in self.slices_mut() {
            a.fill(v);
        }
    }

    fn add(&mut self, o: &Params) {
        self.u += &o.u;
        self.v += &o.v;
        self.db += &o.db;
        self.wc += &o.wc;
        self.bc += &o.bc;
    }

    fn slices_mut(&mut self) -> [&mut [f32]; 5] {
        [
            self.u.as_slice_mut().expect("standard layout"),
            self.v.as_slice_mut().expect("standard layout"),
            self.db.as_slice_mut().expect("standard layout"),
            self.wc.as_slice_mut().expect("standard layout"),
            self.bc.as_slice_mut().expect("standard layout"),
        ]
    }
}

/// The hyper-parameters training reads.
struct Setup {
    power: f32,
    l2sp: f32,
    alpha: f32,
    lr: f32,
}

/// What the classifier sees of one example's block output.
pub(crate) struct Pooled {
    g: Vec<f32>,            // pooled, cout
    powered: Vec<f32>,      // g^power
    norm: f32,              // ‖g^power‖
    pub(crate) u: Vec<f32>, // g^power / norm: what the classifier sees
}

/// Pools a block output (`P × cout`, before the clip) and transforms it as the heads see it.
pub(crate) fn pooled(block: &TopBlock, z: &Array2<f32>, power: f32) -> Pooled {
    let g = pool_rows(block, z);
    let powered: Vec<f32> = if power == 1.0 {
        g.clone()
    } else {
        g.iter().map(|v| v.max(0.0).powf(power)).collect()
    };
    let norm = powered.iter().map(|v| v * v).sum::<f32>().sqrt();
    let u = if norm > 0.0 {
        powered.iter().map(|v| v / norm).collect()
    } else {
        powered.clone()
    };
    Pooled {
        g,
        powered,
        norm,
        u,
    }
}

/// One example's forward pass.
struct Forward {
    q: Array2<f32>, // P × r: a·U
    z: Array2<f32>, // P × cout, before the clip
    f: Pooled,
}

fn forward(cache: &Cache, i: usize, p: &Params, power: f32) -> Forward {
    let q = cache.a(i).dot(&p.u);
    let mut z = cache.z0[i].clone();
    general_mat_mul(1.0, &q, &p.v.t(), 1.0, &mut z);
    z += &p.db;
    let f = pooled(cache.block, &z, power);
    Forward { q, z, f }
}

/// The linear classifier's logits on `u`.
pub(crate) fn classifier_logits(wc: &Array2<f32>, bc: &Array1<f32>, u: &[f32]) -> Vec<f32> {
    let u = ArrayView2::from_shape((u.len(), 1), u).expect("cout × 1");
    let l = wc.dot(&u);
    l.iter().zip(bc).map(|(a, b)| a + b).collect()
}

/// The backward pass from the loss to the block's output for one example: adds the
/// classifier's gradient (cross-entropy scaled by `scale`) to `gwc`, `gbc`, and returns the
/// loss and `dZ` (`P × cout`, in `z`'s place; `None` where the gradient stops at the
/// normalisation).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_backward(
    block: &TopBlock,
    mut z: Array2<f32>,
    f: &Pooled,
    wc: &Array2<f32>,
    bc: &Array1<f32>,
    label: usize,
    power: f32,
    scale: f32,
    gwc: &mut Array2<f32>,
    gbc: &mut Array1<f32>,
) -> (f32, Option<Array2<f32>>) {
    let probs = softmax(&classifier_logits(wc, bc, &f.u));
    let loss = -(probs[label].max(1e-12)).ln();
    let dl: Vec<f32> = probs
        .iter()
        .enumerate()
        .map(|(c, pr)| (pr - f32::from(c == label)) * scale)
        .collect();
    let cout = block.cout;
    // Classifier.
    let mut du = vec![0f32; cout];
    for (c, d) in dl.iter().enumerate() {
        if *d == 0.0 {
            continue;
        }
        gbc[c] += d;
        let row = wc.row(c);
        let mut grow = gwc.row_mut(c);
        for k in 0..cout {
            grow[k] += d * f.u[k];
            du[k] += d * row[k];
        }
    }
    // L2 normalisation, then the power.
    if f.norm <= EPS {
        return (loss, None);
    }
    let ud: f32 = f.u.iter().zip(&du).map(|(a, b)| a * b).sum();
    let dg: Vec<f32> = (0..cout)
        .map(|k| {
            let dq = (du[k] - f.u[k] * ud) / f.norm;
            let g = f.g[k];
            if g <= EPS {
                0.0
            } else if power == 1.0 {
                dq
            } else {
                // d(g^power)/dg = power · g^power / g
                dq * power * f.powered[k] / g
            }
        })
        .collect();
    // Pool and clip: dZ (P × cout). Per channel, the pool's factor: 1/P for the average,
    // g^(1−p)/P for GeM (times v^(p−1) per value).
    let positions = z.nrows() as f32;
    let (lo, hi) = block.clip;
    let factor: Vec<f32> = (0..cout)
        .map(|k| match block.gem_power {
            _ if dg[k] == 0.0 => 0.0,
            None => dg[k] / positions,
            Some(3.0) => dg[k] / (f.g[k] * f.g[k] * positions),
            Some(pw) => dg[k] * f.g[k].powf(1.0 - pw) / positions,
        })
        .collect();
    for mut row in z.rows_mut() {
        let row = row.as_slice_mut().expect("standard layout");
        let inside = |zv: f32| zv > lo && zv < hi;
        match block.gem_power {
            None => row.iter_mut().zip(&factor).for_each(|(d, fk)| {
                *d = if inside(*d) { *fk } else { 0.0 };
            }),
            Some(3.0) => row.iter_mut().zip(&factor).for_each(|(d, fk)| {
                let zv = *d;
                *d = if inside(zv) { fk * zv * zv } else { 0.0 };
            }),
            Some(pw) => row.iter_mut().zip(&factor).for_each(|(d, fk)| {
                let zv = *d;
                *d = if inside(zv) {
                    fk * gem_slope(pw, zv)
                } else {
                    0.0
                };
            }),
        }
    }
    (loss, Some(z))
}

/// Adds one example's loss gradient (cross-entropy scaled by `scale`) to `grad`; returns its
/// loss.
fn backward(
    cache: &Cache,
    i: usize,
    label: usize,
    p: &Params,
    setup: &Setup,
    scale: f32,
    grad: &mut Params,
) -> f32 {
    let Forward { q, z, f } = forward(cache, i, p, setup.power);
    let (loss, dz) = pool_backward(
        cache.block,
        z,
        &f,
        &p.wc,
        &p.bc,
        label,
        setup.power,
        scale,
        &mut grad.wc,
        &mut grad.bc,
    );
    let Some(dz) = dz else {
        return loss;
    };
    grad.db += &dz.sum_axis(Axis(0));
    // dV += dZᵀ·q ; dQ = dZ·V ; dU += aᵀ·dQ
    general_mat_mul(1.0, &dz.t(), &q, 1.0, &mut grad.v);
    let dq = dz.dot(&p.v);
    general_mat_mul(1.0, &cache.a(i).t(), &dq, 1.0, &mut grad.u);
    loss
}

/// Adam over shuffled mini-batches of [`BATCH`], the examples of a batch split over threads.
struct Trainer<'c, 'a> {
    cache: &'c Cache<'a>,
    train: Vec<usize>,
    y: Vec<usize>,
    setup: Setup,
    p: Params,
    m: Params,
    v: Params,
    t: i32,
    rng: rand::rngs::StdRng,
    /// Per thread: its share's gradient.
    work: Vec<Params>,
}

/// Examples per Adam step.
pub(crate) const BATCH: usize = 32;

/// Threads a fit splits each mini-batch over: the CPUs this process may run on.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}

/// A mini-batch's gradient: the examples of `batch` split over the workspaces `work` (one
/// thread each, each with its buffers and gradient, kept from step to step), `part` computing
/// one share in its workspace. Returns how many of the workspaces (the first ones) it used.
pub(crate) fn batch_gradient<W: Send>(
    batch: &[usize],
    work: &mut [W],
    part: impl Fn(&[usize], &mut W) + Sync,
) -> usize {
    let per = batch.len().div_ceil(work.len().max(1)).max(1);
    let shares: Vec<&[usize]> = batch.chunks(per).collect();
    let part = &part;
    match (shares.as_slice(), work) {
        ([], _) | (_, []) => 0,
        ([one], [w, ..]) => {
            part(one, w);
            1
        }
        (_, work) => {
            std::thread::scope(|s| {
                for (share, w) in shares.iter().zip(work.iter_mut()) {
                    s.spawn(move || part(share, w));
                }
            });
            shares.len()
        }
    }
}

/// One Adam step (t counts from 1) on parameters `p` with gradient `g` and moments `m`, `v`.
pub(crate) fn adam_update(t: i32, lr: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    let c1 = 1.0 - B1.powi(t);
    let c2 = 1.0 - B2.powi(t);
    for j in 0..p.len() {
        m[j] = B1 * m[j] + (1.0 - B1) * g[j];
        v[j] = B2 * v[j] + (1.0 - B2) * g[j] * g[j];
        p[j] -= lr * (m[j] / c1) / ((v[j] / c2).sqrt() + 1e-8);
    }
}

impl<'c, 'a> Trainer<'c, 'a> {
    /// `lp`: the linear probe (logistic weights `classes × cout` and biases) to start from.
    fn new(
        cache: &'c Cache<'a>,
        train: Vec<usize>,
        y: &[usize],
        params: &HeadParams,
        lp: (Vec<f32>, Vec<f32>),
        seed: u64,
    ) -> Trainer<'c, 'a> {
        let block = cache.block;
        let rank = params.finetune_rank.max(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let spread = (1.0 / block.cin as f32).sqrt();
        let u = Array2::from_shape_fn((block.cin, rank), |_| rng.gen_range(-spread..spread));
        let classes = lp.1.len();
        let p = Params {
            u,
            v: Array2::zeros((block.cout, rank)),
            db: Array1::zeros(block.cout),
            wc: Array2::from_shape_vec((classes, block.cout), lp.0).expect("classes × cout"),
            bc: Array1::from(lp.1),
        };
        let zero = p.zeros_like();
        Trainer {
            cache,
            train,
            y: y.to_vec(),
            setup: Setup {
                power: params.power,
                l2sp: params.finetune_l2sp as f32,
                alpha: params.logistic_alpha as f32,
                lr: params.finetune_lr as f32,
            },
            m: zero.clone(),
            work: vec![zero.clone(); threads()],
            v: zero,
            p,
            t: 0,
            rng,
        }
    }

    fn epoch(&mut self) {
        use rand::seq::SliceRandom;
        let mut order = self.train.clone();
        order.shuffle(&mut self.rng);
        let n = self.train.len() as f32;
        for batch in order.chunks(BATCH) {
            self.step(batch, n);
        }
    }

    fn step(&mut self, batch: &[usize], n: f32) {
        let scale = 1.0 / batch.len() as f32;
        let (p, cache, setup, y) = (&self.p, self.cache, &self.setup, &self.y);
        let shares = batch_gradient(batch, &mut self.work, |part, g| {
            g.fill(0.0);
            for &i in part {
                backward(cache, i, y[i], p, setup, scale, g);
            }
        });
        let mut grad = self.work[0].clone();
        for g in self.work.iter().skip(1).take(shares.saturating_sub(1)) {
            grad.add(g);
        }
        // The classifier's L2 (as the logistic head's: alpha on the summed loss, so alpha / n
        // on the mean) and L2-SP on the block's change: λ(‖V·Uᵀ‖² + ‖db‖²).
        grad.wc.scaled_add(self.setup.alpha / n, &self.p.wc);
        let l2 = 2.0 * self.setup.l2sp;
        if l2 > 0.0 {
            let vtv = self.p.v.t().dot(&self.p.v);
            let utu = self.p.u.t().dot(&self.p.u);
            grad.u.scaled_add(l2, &self.p.u.dot(&vtv));
            grad.v.scaled_add(l2, &self.p.v.dot(&utu));
            grad.db.scaled_add(l2, &self.p.db);
        }
        self.adam(&grad);
    }

    fn adam(&mut self, grad: &Params) {
        self.t += 1;
        let lr = self.setup.lr;
        let mut grad = grad.clone();
        let gs = grad.slices_mut();
        let ps = self.p.slices_mut();
        let ms = self.m.slices_mut();
        let vs = self.v.slices_mut();
        for (((p, g), m), v) in ps.into_iter().zip(gs).zip(ms).zip(vs) {
            adam_update(self.t, lr, p, g, m, v);
        }
    }

    fn logits(&self, i: usize) -> Vec<f32> {
        let f = forward(self.cache, i, &self.p, self.setup.power).f;
        classifier_logits(&self.p.wc, &self.p.bc, &f.u)
    }

    /// The fitted model: the merged block (`W0 + V·Uᵀ`, `b0 + db`) and the classifier.
    fn model(&self) -> Inner {
        let block = self.cache.block;
        let w0 = ArrayView2::from_shape((block.cout, block.cin), &block.weights).expect("cout×cin");
        let w = &w0 + &self.p.v.dot(&self.p.u.t());
        let tuned = TopBlock {
            weights: w.as_standard_layout().iter().copied().collect(),
            bias: block
                .bias
                .iter()
                .zip(&self.p.db)
                .map(|(a, b)| a + b)
                .collect(),
            ..block.clone()
        };
        Inner::Trunk {
            block: Box::new(tuned),
            power: self.setup.power,
            inner: Box::new(Inner::Linear {
                weights: self.p.wc.iter().copied().collect(),
                bias: self.p.bc.to_vec(),
                dim: block.cout,
            }),
        }
    }
}

/// The linear probe on the pretrained features of `idx`: the logistic head's weights
/// (`classes × cout`) and biases.
pub(crate) fn linear_probe(
    features: &[Vec<f32>],
    idx: &[usize],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
) -> Result<(Vec<f32>, Vec<f32>), HeadError> {
    let x: Vec<Vec<f32>> = idx.iter().map(|i| features[*i].clone()).collect();
    let ty: Vec<usize> = idx.iter().map(|i| y[*i]).collect();
    match super::fit::fit_plain(HeadKind::Logistic, &x, &ty, classes, params)? {
        Inner::Linear { weights, bias, .. } => Ok((weights, bias)),
        _ => Err(HeadError::Fit {
            kind: HeadKind::Finetune,
            reason: "the linear probe is not linear".into(),
        }),
    }
}

impl Cache<'_> {
    /// The pretrained features (`W0`, `b0`), transformed as the heads see them.
    fn pretrained(&self, power: f32) -> Vec<Vec<f32>> {
        parallel_map(&self.z0, |z| transform(power, &pool_rows(self.block, z)))
    }
}

/// Fine-tunes on every example of `raw` for `epochs` epochs (0: the linear probe on the
/// pretrained block).
pub(crate) fn fit(
    block: &TopBlock,
    raw: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
    epochs: usize,
) -> Result<Inner, HeadError> {
    check_input(block, raw)?;
    if block.pre.is_some() {
        return super::deep::fit(block, raw, y, classes, params, epochs);
    }
    let cache = Cache::new(block, raw);
    let all: Vec<usize> = (0..raw.len()).collect();
    let lp = linear_probe(&cache.pretrained(params.power), &all, y, classes, params)?;
    let mut trainer = Trainer::new(&cache, all, y, params, lp, SEED);
    for _ in 0..epochs {
        trainer.epoch();
    }
    Ok(trainer.model())
}

/// Training's own seed (the low-rank factor's start and the batch order): a refit of the same
/// examples gives the same head.
pub(crate) const SEED: u64 = 0x0067_7261_6674;

fn check_input(block: &TopBlock, raw: &[Vec<f32>]) -> Result<(), HeadError> {
    match raw.iter().find(|r| r.len() != block.input_size()) {
        Some(r) => Err(HeadError::Dimension {
            got: r.len(),
            want: block.input_size(),
        }),
        None => Ok(()),
    }
}

/// Early stopping by grouped cross-validation: per fold (`folds[i]`, examples of one object
/// share a fold), fine-tunes on the others and scores the held-out examples at every
/// [`EPOCH_CHECKPOINTS`] epoch count. Returns per checkpoint the held-out logits (`None`
/// where the example's class was not in its training fold).
pub(crate) fn checkpoint_logits(
    block: &TopBlock,
    raw: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    plan: &FoldPlan,
    params: &HeadParams,
) -> Result<Vec<(Logits, Logits)>, HeadError> {
    check_input(block, raw)?;
    let checkpoints = checkpoints(block, params);
    if block.pre.is_some() {
        return super::deep::checkpoint_logits(block, raw, y, classes, plan, params, &checkpoints);
    }
    let n = raw.len();
    let cache = Cache::new(block, raw);
    let pretrained = cache.pretrained(params.power);
    let mut out = vec![(vec![None; n], vec![None; n]); checkpoints.len()];
    for f in 0..plan.len() {
        let (train, test, novel) = plan.split(f, y, classes);
        if train.is_empty() || (test.is_empty() && novel.is_empty()) {
            continue;
        }
        let lp = linear_probe(&pretrained, &train, y, classes, params)?;
        let mut trainer = Trainer::new(&cache, train, y, params, lp, SEED ^ f as u64);
        let mut done = 0;
        for (c, &epochs) in checkpoints.iter().enumerate() {
            while done < epochs {
                trainer.epoch();
                done += 1;
            }
            for &i in &test {
                out[c].0[i] = Some(trainer.logits(i));
            }
            for &i in &novel {
                out[c].1[i] = Some(trainer.logits(i));
            }
        }
    }
    Ok(out)
}

/// The epoch counts early stopping scores: [`EPOCH_CHECKPOINTS`] (one block deeper:
/// [`super::deep::DEEP_EPOCHS`] alone), or the one the params fix.
pub(crate) fn checkpoints(block: &TopBlock, params: &HeadParams) -> Vec<usize> {
    match params.finetune_epochs {
        Some(e) => vec![e],
        None if block.pre.is_some() => vec![super::deep::DEEP_EPOCHS],
        None => EPOCH_CHECKPOINTS.to_vec(),
    }
}

/// The checkpoint (of [`checkpoints`]) with the best held-out accuracy (ties: the fewer
/// epochs): its index, epochs and accuracy.
pub(crate) fn choose_epochs(
    block: &TopBlock,
    per_checkpoint: &[(Logits, Logits)],
    y: &[usize],
    params: &HeadParams,
) -> (usize, usize, f64) {
    let epochs = checkpoints(block, params);
    let mut best = (0, 0, f64::NEG_INFINITY);
    for (c, (logits, _)) in per_checkpoint.iter().enumerate() {
        let (mut right, mut scored) = (0usize, 0usize);
        for (l, t) in logits.iter().zip(y) {
            if let Some(l) = l {
                scored += 1;
                right += usize::from(super::cv::argmax(l) == *t);
            }
        }
        let acc = if scored > 0 {
            right as f64 / scored as f64
        } else {
            0.0
        };
        if acc > best.2 + 1e-12 {
            best = (c, epochs[c], acc);
        }
    }
    best
}

/// The gradient of [`backward`] against finite differences, through every stage (low-rank
/// update, bias, clip, GeM, power, L2, classifier), on a small random block.
#[cfg(test)]
mod tests {
    use super::*;

    fn block(gem: Option<f32>) -> TopBlock {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (cin, cout, positions) = (6, 5, 4);
        TopBlock {
            node: "test".into(),
            cin,
            cout,
            positions,
            weights: (0..cin * cout).map(|_| rng.gen_range(-0.5..0.5)).collect(),
            bias: (0..cout).map(|_| rng.gen_range(0.0..0.5)).collect(),
            clip: (0.0, 6.0),
            gem_power: gem,
            pre: None,
        }
    }

    fn raw(n: usize, b: &TopBlock, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..b.input_size())
                    .map(|_| rng.gen_range(0.0..2.0))
                    .collect()
            })
            .collect()
    }

    fn loss(cache: &Cache, p: &Params, setup: &Setup, idx: &[usize], y: &[usize]) -> f64 {
        idx.iter()
            .map(|&i| {
                let f = forward(cache, i, p, setup.power).f;
                let pr = softmax(&classifier_logits(&p.wc, &p.bc, &f.u));
                -(pr[y[i]] as f64).ln()
            })
            .sum()
    }

    #[test]
    fn gradients_match_finite_differences() {
        for gem in [Some(3.0), None] {
            for power in [0.75, 1.0] {
                let b = block(gem);
                let x = raw(3, &b, 1);
                let y = vec![0, 1, 2];
                let cache = Cache::new(&b, &x);
                let mut rng = rand::rngs::StdRng::seed_from_u64(3);
                let mut r = |shape: (usize, usize)| {
                    Array2::from_shape_fn(shape, |_| rng.gen_range(-0.3f32..0.3))
                };
                let p = Params {
                    u: r((b.cin, 2)),
                    v: r((b.cout, 2)),
                    db: r((1, b.cout)).row(0).to_owned(),
                    wc: r((3, b.cout)),
                    bc: r((1, 3)).row(0).to_owned(),
                };
                let setup = Setup {
                    power,
                    l2sp: 0.0,
                    alpha: 0.0,
                    lr: 0.0,
                };
                let mut grad = p.zeros_like();
                for (i, label) in y.iter().enumerate() {
                    backward(&cache, i, *label, &p, &setup, 1.0, &mut grad);
                }
                let idx = [0, 1, 2];
                let h = 1e-2f32;
                let mut checked = 0;
                for which in 0..5 {
                    let n = p.clone().slices_mut()[which].len();
                    for j in 0..n {
                        let mut plus = p.clone();
                        plus.slices_mut()[which][j] += h;
                        let mut minus = p.clone();
                        minus.slices_mut()[which][j] -= h;
                        let numeric = (loss(&cache, &plus, &setup, &idx, &y)
                            - loss(&cache, &minus, &setup, &idx, &y))
                            / (2.0 * h as f64);
                        let analytic = grad.clone().slices_mut()[which][j] as f64;
                        assert!(
                            (numeric - analytic).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                            "gem {gem:?} power {power} param {which}[{j}]: numeric {numeric}, analytic {analytic}"
                        );
                        checked += 1;
                    }
                }
                // Every number: U 6×2, V 5×2, db 5, Wc 3×5, bc 3.
                assert_eq!(checked, 45);
            }
        }
    }

    #[test]
    fn zero_epochs_is_the_pretrained_block_and_the_linear_probe() {
        let b = block(Some(3.0));
        let x = raw(12, &b, 2);
        let y: Vec<usize> = (0..12).map(|i| i % 3).collect();
        let params = HeadParams::default();
        let Inner::Trunk { block: tuned, .. } = fit(&b, &x, &y, 3, &params, 0).unwrap() else {
            panic!("not a trunk")
        };
        assert_eq!(tuned.bias, b.bias);
        for (a, w) in tuned.weights.iter().zip(&b.weights) {
            assert!((a - w).abs() < 1e-6);
        }
        // And features through the cache equal the direct computation.
        let cache = Cache::new(&b, &x);
        let via_cache = cache.pretrained(params.power);
        for (r, c) in x.iter().zip(&via_cache) {
            let direct = transform(params.power, &features(&b, r));
            for (a, d) in direct.iter().zip(c) {
                assert!((a - d).abs() < 1e-5);
            }
        }
    }
}

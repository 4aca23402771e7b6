//! The `graft` binary: a thin shell over the library. Arguments are parsed in two stages (raw
//! flags with clap, then the components they build: the backbone, the heads); each command
//! group lives in its own file. It prints one clear line and exits non-zero on error.
//!
//! Configuration from the environment (`GRAFT_THREADS`, `GRAFT_BOARD`, `GRAFT_DEVICE`,
//! `GRAFT_CACHE`, `GRAFT_GPU_ADAPTER`, `GRAFT_GPU_BATCH`, `GRAFT_LOG`) is read here, through
//! clap's `env =`, and passed down as options: the library never reads the environment.

mod bench;
mod camera;
mod classify;
mod device;
mod doctor;
mod embed;
mod export;
mod fleet;
mod heads;
mod info;
mod output;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use graft::backbone::{CpuKernels, DeviceChoice};

/// Grow new image classifiers on the edge.
#[derive(Debug, Parser)]
#[command(name = "graft", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Backbone: a manifest path or a bundled model name (efficientnet-lite0 [the default;
    /// fp32-gem on x86, w8-gem on ARM], efficientnet-lite0-fp32, efficientnet-lite0-int8,
    /// efficientnet-lite0-w8 [the int8 file with float activations], and -fp32-gem, -w8-gem
    /// [features by GeM pooling], -f16-gem [f16 arithmetic, for ARMv8.2 FP16 CPUs]). Commands that read a head (or a kiosk's data folder)
    /// default to the backbone it was made with.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Machine-readable output on stdout (JSON, one object per line), nothing else there.
    #[arg(long, global = true)]
    pub json: bool,
    /// Threads for inference (bulk work runs this many images at once) [default: the board
    /// profile's, else 1].
    #[arg(long, global = true, env = "GRAFT_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// Board profile (boards/*.toml: pi-zero-2w, pi3-armv7, pi3-aarch64, pi4, pi5,
    /// jetson-orin-nano, x86_64) [default: detected from /proc/device-tree/model and the CPU].
    #[arg(long, global = true, env = "GRAFT_BOARD")]
    pub board: Option<String>,
    /// Where the backbone runs: auto (a hardware GPU faster than the CPU when graft is built
    /// with the `gpu` feature and one is there, else the CPU), cpu, or gpu (any GPU adapter,
    /// software ones included; an error without one).
    #[arg(long, global = true, env = "GRAFT_DEVICE", default_value_t = DeviceChoice::Auto,
          value_parser = clap::builder::PossibleValuesParser::new(["auto", "cpu", "gpu"])
              .map(|s| s.parse::<DeviceChoice>().unwrap_or_default()))]
    pub device: DeviceChoice,
    /// Whose CPU kernels run the convolutions: graft (its own depthwise, stem and 1x1 kernels,
    /// vectorised for this CPU, the wide maps' expand 1x1s run inside the depthwise ones),
    /// unfused (the same, each operator on its own), depthwise (graft's depthwise alone),
    /// tract (tract's plan unchanged) or vector (graft's, the 1x1s on the vector units even
    /// where the CPU has a matrix unit, AMX); the last four are for A/B comparisons.
    #[arg(long, global = true, env = "GRAFT_CPU_KERNELS", default_value_t = CpuKernels::Graft,
          value_parser = clap::builder::PossibleValuesParser::new(["graft", "unfused", "depthwise", "tract", "vector"])
              .map(|s| s.parse::<CpuKernels>().unwrap_or_default()))]
    pub cpu_kernels: CpuKernels,
    /// With the GPU: take the adapter whose name contains this text (see `graft info`).
    #[arg(long, global = true, env = "GRAFT_GPU_ADAPTER")]
    pub gpu_adapter: Option<String>,
    /// With the GPU: the most images per dispatch.
    #[arg(long, global = true, env = "GRAFT_GPU_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub gpu_batch: u32,
    /// More log lines on stderr (-v: debug); GRAFT_LOG=error|warn|info|debug also sets the level.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Log lines on stderr: `graft: warn: ...`, or with systemd priority prefixes (`<4>...`) when
/// stderr goes to the journal (`JOURNAL_STREAM` set), so `journalctl -p warning` works.
struct StderrLog {
    level: log::LevelFilter,
    journal: bool,
}

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        // Libraries (tract's CPU detection, ...) speak only at -v or for errors.
        let own = m.target().starts_with("graft");
        m.level() <= self.level
            && (own || m.level() == log::Level::Error || self.level >= log::LevelFilter::Debug)
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if self.journal {
            let prio = match r.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                _ => 7,
            };
            eprintln!("<{prio}>{}", r.args());
        } else {
            eprintln!(
                "graft: {}: {}",
                r.level().as_str().to_ascii_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_log(verbose: u8) {
    let from_env = std::env::var("GRAFT_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok());
    let level = match verbose {
        0 => from_env.unwrap_or(log::LevelFilter::Info),
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let logger = StderrLog {
        level,
        journal: std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classify images with the backbone's own ImageNet classifier (top-k classes).
    Classify {
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// How many classes to show per image.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
        top: u16,
    },
    /// Embed images (files or folders, recursively) into an embedding file (JSON lines).
    Embed {
        /// Image files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Where to write the embeddings (JSON lines: a header, then one image per line).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the backbone's manifest, identity, sizes and the CPU features tract uses.
    Info,
    /// Train a few-shot head on an image folder (DATASET/<label>/*.jpg).
    Train(heads::TrainArgs),
    /// Predict with a trained head (label or `unknown`, score, top-3).
    Predict(heads::PredictArgs),
    /// Add examples (or a new class) to a head and refit it in place.
    Add(heads::AddArgs),
    /// Evaluate a head type on a labelled folder (k-fold or few-shot trials).
    Eval(heads::EvalArgs),
    /// Learning curve: accuracy vs examples per class, backbone features vs raw pixels.
    Curve(heads::CurveArgs),
    /// Export a head with its backbone as one ONNX file (or the head alone as JSON).
    Export(export::ExportArgs),
    /// List the cameras (V4L2 devices) with their formats, sizes and rates.
    Cameras,
    /// Save frames from a camera (or --source images) as examples: DATASET/LABEL/*.jpg.
    Capture(camera::CaptureArgs),
    /// Live predictions from a camera (or --source images), smoothed and debounced.
    Watch(camera::WatchArgs),
    /// Check what a kiosk needs: model, camera, serial port, groups, data folder, board.
    Doctor(doctor::DoctorArgs),
    /// Serve the kiosk line protocol over a serial port or TCP (see docs/PROTOCOL.md).
    Serve(Box<serve::ServeArgs>),
    /// A fleet of kiosks sharing examples through an MQTT broker (docs/FLEET.md).
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Measure this board: load, preprocess, embed (batch 1 and best), head fit/predict, memory.
    Bench {
        /// Photo to time [default: a photo compiled into graft].
        #[arg(long)]
        image: Option<PathBuf>,
        /// Timed runs per stage (median reported).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=10000))]
        runs: u16,
        /// Largest batch tried when looking for the best batch size (1, 2, 4, ... up to this).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
        max_batch: u16,
        /// Also time every operator of the forward pass (batch 1) and print where time goes.
        #[arg(long)]
        profile: bool,
        /// Leave out head fit / train / predict timing (slow under emulation, e.g. qemu).
        #[arg(long)]
        skip_heads: bool,
    },
}

/// Runs the CLI and maps errors to one line on stderr and a non-zero exit.
fn main() -> ExitCode {
    // Mesa's device-select Vulkan layer (present wherever Mesa's drivers are) probes for a
    // Wayland display and prints an error line without one; graft enumerates adapters itself.
    // SAFETY: before any thread starts, as set_var requires.
    #[cfg(feature = "gpu")]
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
    let cli = Cli::parse();
    // `graft ... | head` must end quietly, as other Unix tools do, not panic on a closed pipe:
    // the one-shot commands take SIGPIPE's default disposition. The commands that hold network
    // connections keep Rust's (ignored): a peer that resets its connection while graft writes
    // to it (the MQTT client writes with `writev`, which has no MSG_NOSIGNAL) must be an error
    // on that connection, never the kiosk's death.
    if !matches!(cli.command, Command::Serve(_) | Command::Fleet(_)) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graft: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        // thiserror messages often repeat their source; keep the line short.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    init_log(g.verbose);
    match cli.command {
        Command::Classify { images, top } => classify::run(&g, &images, top as usize),
        Command::Embed { paths, out } => embed::run(&g, &paths, &out),
        Command::Info => info::run(&g),
        Command::Train(a) => heads::train(&g, a),
        Command::Predict(a) => heads::predict(&g, a),
        Command::Add(a) => heads::add(&g, a),
        Command::Eval(a) => heads::eval(&g, a),
        Command::Curve(a) => heads::curve(&g, a),
        Command::Export(a) => export::run(&g, a),
        Command::Cameras => camera::cameras(&g),
        Command::Serve(a) => serve::run(&g, *a),
        Command::Fleet(c) => fleet::run(&g, c),
        Command::Doctor(a) => doctor::run(&g, a),
        Command::Capture(a) => camera::capture(&g, a),
        Command::Watch(a) => camera::watch(&g, a),
        Command::Bench {
            image,
            runs,
            max_batch,
            profile,
            skip_heads,
        } => bench::run(
            &g,
            bench::Options {
                image,
                runs: runs as usize,
                max_batch: max_batch as usize,
                profile,
                skip_heads,
            },
        ),
    }
}

impl Global {
    /// The board profile: `--board`, else detected, else none.
    pub fn board(&self) -> anyhow::Result<Option<(graft::board::Board, graft::board::Source)>> {
        Ok(match &self.board {
            Some(name) => Some((graft::board::by_name(name)?, graft::board::Source::Given)),
            None => graft::board::detect()?,
        })
    }

    /// Inference threads: `--threads`, else the board's, else 1.
    pub fn threads(&self) -> anyhow::Result<usize> {
        Ok(match self.threads {
            Some(t) => t as usize,
            None => self.board()?.map_or(1, |(b, _)| b.threads()),
        })
    }
}

/// The model a command runs when `--model` is not given: the board's, or the default.
fn fallback_model(g: &Global) -> anyhow::Result<String> {
    Ok(match g.board()? {
        Some((b, _)) => b.model,
        None => graft::backbone::DEFAULT_MODEL.to_string(),
    })
}

/// Loads the backbone `--model` names (or the board's default model, or the default).
pub fn load_backbone(g: &Global) -> anyhow::Result<graft::backbone::Backbone> {
    load_backbone_or(g, &fallback_model(g)?)
}

/// [`load_backbone`] with the plan that also runs the model's own classifier built at load
/// (`graft classify`); the other commands' plan stops at the features.
pub fn load_classifier(g: &Global) -> anyhow::Result<graft::backbone::Backbone> {
    let fallback = fallback_model(g)?;
    Ok(load_model_with(g, g.model.as_deref().unwrap_or(&fallback), true)?.0)
}

/// Loads `--model`, or `fallback` when it was not given, on the `--device` chosen.
pub fn load_backbone_or(g: &Global, fallback: &str) -> anyhow::Result<graft::backbone::Backbone> {
    Ok(load_backbone_on_device(g, fallback)?.0)
}

/// [`load_backbone`] that also hands back the GPU executor when one runs the backbone.
pub fn load_backbone_with_gpu(
    g: &Global,
) -> anyhow::Result<(graft::backbone::Backbone, Option<device::Gpu>)> {
    load_backbone_on_device(g, &fallback_model(g)?)
}

fn load_backbone_on_device(
    g: &Global,
    fallback: &str,
) -> anyhow::Result<(graft::backbone::Backbone, Option<device::Gpu>)> {
    load_model(g, g.model.as_deref().unwrap_or(fallback))
}

/// Loads the model `name` (whatever `--model` says) on the `--device` chosen: for a second
/// backbone beside `--model`'s, e.g. `curve --baseline`.
pub fn load_model(
    g: &Global,
    name: &str,
) -> anyhow::Result<(graft::backbone::Backbone, Option<device::Gpu>)> {
    load_model_with(g, name, false)
}

/// [`load_model`], with `logits`: [`graft::backbone::LoadOptions::logits`].
fn load_model_with(
    g: &Global,
    name: &str,
    logits: bool,
) -> anyhow::Result<(graft::backbone::Backbone, Option<device::Gpu>)> {
    let spec = graft::backbone::ModelSpec::resolve(name)?;
    let options = graft::backbone::LoadOptions {
        threads: g.threads()?,
        cpu_kernels: g.cpu_kernels,
        logits,
    };
    let mut bb = graft::backbone::Backbone::load(spec, &options)?;
    let gpu = device::attach(g, &mut bb)?;
    Ok((bb, gpu))
}

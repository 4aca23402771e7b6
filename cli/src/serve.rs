//! `graft serve`: the kiosk protocol over a serial port or TCP (docs/PROTOCOL.md).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::camera::SourceArgs;
use super::{output, Global};
use graft::kiosk::{Fronts, Kiosk, Options, Secret, SerialFront, Server, TcpOptions, Trust};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serial port to serve on (/dev/serial0, /dev/ttyUSB0, /dev/ttyACM0); without a value, the
    /// board profile's.
    #[arg(long, required_unless_present_any = ["tcp", "http"], num_args = 0..=1, default_missing_value = "board")]
    serial: Option<String>,
    /// Serve on TCP instead, e.g. 127.0.0.1:7070, or 0.0.0.0:7070 for the LAN (clients from
    /// other hosts must AUTH with the kiosk's secret before changing it).
    #[arg(long)]
    tcp: Option<String>,
    /// Serve the web page and its HTTP API (docs/HTTP.md) on ADDR:PORT [default: 127.0.0.1:8080,
    /// this machine only; 0.0.0.0:8080 for the LAN]. Beside --serial and --tcp if given: all
    /// share one kiosk.
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    http: Option<String>,
    /// Web page: live preview frames per second at most (the kiosk classifies each).
    #[arg(long, default_value_t = 15.0, requires = "http")]
    preview_fps: f64,
    /// TCP: let every client change the kiosk without AUTH (protocol version 1 behaviour).
    #[arg(long, requires = "tcp")]
    insecure: bool,
    /// TCP: clients must AUTH even from this machine (loopback).
    #[arg(long, requires = "tcp", conflicts_with = "insecure")]
    auth_loopback: bool,
    /// TCP: reads (INFO, LABELS, CLASSIFY, STREAM, THRESHOLD) need AUTH too.
    #[arg(long, requires = "tcp", conflicts_with = "insecure")]
    auth_reads: bool,
    /// TCP: clients served at once.
    #[arg(long, default_value_t = 8, requires = "tcp")]
    max_clients: usize,
    /// TCP: close a client silent for this many seconds.
    #[arg(long, default_value_t = 300.0, requires = "tcp")]
    idle_timeout: f64,
    /// Baud rate.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Data bits, parity (N/E/O), stop bits.
    #[arg(long, default_value = "8N1")]
    framing: String,
    /// Flow control: none, hardware (RTS/CTS) or software (XON/XOFF).
    #[arg(long, default_value = "none")]
    flow: String,
    /// Data folder: examples, frames, head, settings [default: HEAD's name + .kiosk/].
    #[arg(long, required_unless_present = "head")]
    data: Option<PathBuf>,
    /// A head trained elsewhere, to start an empty data folder from.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Pause between the frames of one LEARN, in seconds [default: 0.2 with a camera, 0 with --source].
    #[arg(long)]
    learn_interval: Option<f64>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    fleet: super::fleet::FleetArgs,
}

#[derive(Serialize)]
struct Listening<'a> {
    listening: &'a str,
    transport: &'a str,
    data: &'a std::path::Path,
}

pub fn run(g: &Global, a: ServeArgs) -> anyhow::Result<()> {
    let data = match (&a.data, &a.head) {
        (Some(d), _) => d.clone(),
        (None, Some(h)) => h.with_extension("kiosk"),
        (None, None) => bail!("give --data DIR (or --head HEAD)"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let model = match &a.head {
        Some(h) if g.model.is_none() => graft::store::headfile::read(h)?.backbone.name,
        _ => Kiosk::recorded_backbone(&data)?
            .unwrap_or_else(|| graft::backbone::DEFAULT_MODEL.to_string()),
    };
    let bb = super::load_backbone_or(g, &model)?;
    let kiosk = Kiosk::open(&data, bb, a.head.as_deref())?;
    let source = a.source.open(g)?;
    let learn_interval = a
        .learn_interval
        .unwrap_or(if a.source.is_camera() { 0.2 } else { 0.0 });
    if !(learn_interval.is_finite() && learn_interval >= 0.0) {
        bail!("--learn-interval {learn_interval} is not a number of seconds");
    }
    log::info!(
        "kiosk {}: {} classes, {} examples, head {}; frames from {}",
        data.display(),
        kiosk.labels().len(),
        kiosk.counts().iter().sum::<usize>(),
        kiosk
            .head()
            .map_or("none".to_string(), |h| h.head.kind.to_string()),
        source.describe()
    );
    let (secret, created) = Secret::load_or_create(&data)?;
    if created {
        eprintln!(
            "graft: this kiosk's secret (the web page's login; TCP clients AUTH with it; `graft doctor --data {}` shows it again): {}",
            data.display(),
            secret.reveal()
        );
    }
    let options = Options {
        learn_interval: Duration::from_secs_f64(learn_interval),
        secret: (!a.insecure).then(|| secret.clone()),
        reads_need_auth: a.auth_reads,
        ..Options::default()
    };
    let mut server = Server::new(kiosk, source, options);
    if !(a.preview_fps.is_finite() && a.preview_fps > 0.0 && a.preview_fps <= 60.0) {
        bail!(
            "--preview-fps {} must be above 0 and at most 60",
            a.preview_fps
        );
    }
    let mut fronts = Fronts::default();
    if let Some(addr) = &a.tcp {
        if !(a.idle_timeout.is_finite() && a.idle_timeout > 0.0) {
            bail!(
                "--idle-timeout {} is not a number of seconds",
                a.idle_timeout
            );
        }
        if a.max_clients == 0 {
            bail!("--max-clients must be at least 1");
        }
        let tcp = TcpOptions {
            max_clients: a.max_clients,
            idle_timeout: Duration::from_secs_f64(a.idle_timeout),
            trust: if a.insecure {
                Trust::Everyone
            } else if a.auth_loopback {
                Trust::Nobody
            } else {
                Trust::Loopback
            },
            ..TcpOptions::default()
        };
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        if tcp.trust == Trust::Everyone && !local.ip().is_loopback() {
            log::warn!("--insecure on {local}: anyone who reaches this port can change the kiosk");
        }
        announce(g, &local.to_string(), "tcp", &data)?;
        fronts.tcp = Some((listener, tcp));
    }
    if let Some(path) = &a.serial {
        let path = if path == "board" {
            g.board()?.map(|(b, _)| b.serial.device).ok_or_else(|| {
                anyhow::anyhow!("--serial without a path needs a board profile (--board NAME)")
            })?
        } else {
            path.clone()
        };
        fronts.serial = Some(serial_front(g, &a, &path, &data)?);
    }
    let feed = Arc::new(graft::kiosk::Feed::new(a.preview_fps, 640, 80));
    if let Some(addr) = &a.http {
        fronts
            .others
            .push(web_front(g, addr, &data, &secret, created, &stop)?);
    }
    if let Some(front) = super::fleet::join(&a.fleet, &data, &mut server, &stop)? {
        fronts.others.push(front);
    }
    server.run(fronts, feed, &stop);
    log::info!("stopped after {} replies", server.answered);
    Ok(())
}

fn announce(
    g: &Global,
    listening: &str,
    transport: &str,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    if g.json {
        output::json_line(&Listening {
            listening,
            transport,
            data,
        })
    } else {
        println!("listening on {transport} {listening}");
        Ok(())
    }
}

#[cfg(feature = "serial")]
fn serial_front(
    g: &Global,
    a: &ServeArgs,
    path: &str,
    data: &std::path::Path,
) -> anyhow::Result<SerialFront<'static>> {
    use graft::serial::{self, SerialConfig};
    let config = SerialConfig {
        path: path.to_string(),
        baud: a.baud,
        framing: a.framing.parse()?,
        flow: a.flow.parse()?,
    };
    // A port missing at start is an error (a typo, or the unit started too early); one that
    // disappears later (USB unplug) is waited for.
    let link = serial::open(&config)?;
    announce(g, &config.to_string(), "serial", data)?;
    Ok(SerialFront {
        name: path.to_string(),
        link: Box::new(link),
        reopen: Box::new(move || {
            serial::open(&config)
                .map(|l| Box::new(l) as Box<dyn graft::kiosk::Link>)
                .map_err(std::io::Error::other)
        }),
    })
}

#[cfg(not(feature = "serial"))]
fn serial_front(
    _: &Global,
    _: &ServeArgs,
    _: &str,
    _: &std::path::Path,
) -> anyhow::Result<SerialFront<'static>> {
    bail!("this graft was built without serial support: rebuild with `--features serial`, or use --tcp ADDR")
}

#[cfg(feature = "web")]
fn web_front<'a>(
    g: &Global,
    addr: &str,
    data: &std::path::Path,
    secret: &Secret,
    first_start: bool,
    stop: &'a AtomicBool,
) -> anyhow::Result<graft::kiosk::hub::Front<'a>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    announce(g, &format!("http://{local}/"), "http", data)?;
    if first_start {
        // Where a phone can log in in one tap (the fragment never leaves the browser).
        let host = if local.ip().is_unspecified() {
            format!("THIS-KIOSK:{}", local.port())
        } else {
            local.to_string()
        };
        eprintln!(
            "graft: the web page logs in from http://{host}/#secret={}",
            secret.reveal()
        );
    }
    let secret = secret.clone();
    Ok(Box::new(move |handle| {
        graft::web::serve(
            listener,
            handle,
            secret,
            &graft::web::WebOptions::default(),
            stop,
        )
    }))
}

#[cfg(not(feature = "web"))]
fn web_front<'a>(
    _: &Global,
    _: &str,
    _: &std::path::Path,
    _: &Secret,
    _: bool,
    _: &'a AtomicBool,
) -> anyhow::Result<graft::kiosk::hub::Front<'a>> {
    bail!("this graft was built without the web page: rebuild with `--features web`")
}

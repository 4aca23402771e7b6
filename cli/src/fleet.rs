//! `graft serve --fleet ...` and `graft fleet status | simulate` (docs/FLEET.md).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::Global;

/// How to reach the fleet: shared by `serve` and `fleet`.
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// Share examples with the other kiosks of a fleet through this MQTT broker:
    /// mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS).
    #[arg(long, env = "GRAFT_FLEET")]
    pub fleet: Option<String>,
    /// The fleet's name (topics graft/NAME/...).
    #[arg(long, env = "GRAFT_FLEET_NAME", default_value = "graft")]
    pub fleet_name: String,
    /// File holding the fleet key (≥ 16 bytes) every message is authenticated with; or the
    /// key itself in GRAFT_FLEET_KEY.
    #[arg(long)]
    pub fleet_key_file: Option<PathBuf>,
    /// Broker user name, if the broker asks for one.
    #[arg(long, env = "GRAFT_FLEET_USER")]
    pub fleet_user: Option<String>,
    /// File holding the broker password; or the password itself in GRAFT_FLEET_PASSWORD.
    #[arg(long)]
    pub fleet_password_file: Option<PathBuf>,
    /// CA certificate(s), PEM, that sign the broker's certificate (mqtts://) [default: the
    /// system's].
    #[arg(long)]
    pub fleet_ca: Option<PathBuf>,
    /// This kiosk's id in the fleet [default: kept in DATA/fleet.json; the host name and 8
    /// random hex digits at the first start].
    #[arg(long, env = "GRAFT_KIOSK_ID")]
    pub kiosk_id: Option<String>,
}

#[cfg(feature = "fleet")]
fn secret(file: &Option<PathBuf>, env: &str, what: &str) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        use anyhow::Context;
        let bytes = std::fs::read(f).with_context(|| format!("reading the {what} file"))?;
        let s = String::from_utf8(bytes)
            .with_context(|| format!("{}: the {what} is not UTF-8 text", f.display()))?;
        return Ok(Some(s.trim().to_string()));
    }
    Ok(std::env::var(env).ok().map(|s| s.trim().to_string()))
}

#[cfg(feature = "fleet")]
impl FleetArgs {
    /// The fleet's configuration; `None` without `--fleet`.
    pub fn config(&self) -> anyhow::Result<Option<graft::fleet::FleetConfig>> {
        let Some(url) = &self.fleet else {
            return Ok(None);
        };
        let key =
            secret(&self.fleet_key_file, "GRAFT_FLEET_KEY", "fleet key")?.ok_or_else(|| {
                anyhow::anyhow!(
                    "--fleet needs the fleet key: --fleet-key-file FILE or GRAFT_FLEET_KEY"
                )
            })?;
        let login = match &self.fleet_user {
            Some(u) => {
                let p = secret(
                    &self.fleet_password_file,
                    "GRAFT_FLEET_PASSWORD",
                    "broker password",
                )?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--fleet-user needs --fleet-password-file FILE or GRAFT_FLEET_PASSWORD"
                    )
                })?;
                Some((u.clone(), p))
            }
            None => None,
        };
        let c = graft::fleet::FleetConfig {
            url: url.clone(),
            name: self.fleet_name.clone(),
            key: key.into_bytes(),
            login,
            ca: self.fleet_ca.clone(),
        };
        c.check()?;
        Ok(Some(c))
    }
}

/// Joins `server` to its fleet when `--fleet` is given: the front end to serve beside the
/// others.
#[cfg(feature = "fleet")]
pub fn join(
    a: &FleetArgs,
    data: &std::path::Path,
    server: &mut graft::kiosk::Server,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Option<graft::kiosk::hub::Front<'static>>> {
    let Some(config) = a.config()? else {
        return Ok(None);
    };
    let id = graft::kiosk::fleet_identity(data, &config.name, a.kiosk_id.as_deref())?;
    let tag = graft::kiosk::wire::backbone_tag(server.kiosk().backbone().id());
    let replica = graft::kiosk::replica::Replica::open(&data.join("fleet.log"), &id, tag)?;
    log::info!(
        "fleet {}: kiosk {id}, {} operations known; broker {}",
        config.name,
        replica.len(),
        config.url
    );
    let (outbox, front) = graft::fleet::connect(config, &id, std::sync::Arc::clone(stop))?;
    server.join_fleet(replica, outbox)?;
    Ok(Some(front))
}

#[cfg(not(feature = "fleet"))]
pub fn join(
    a: &FleetArgs,
    _data: &std::path::Path,
    _server: &mut graft::kiosk::Server,
    _stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Option<graft::kiosk::hub::Front<'static>>> {
    if a.fleet.is_some() {
        bail!("this graft was built without fleets: build it with `--features fleet`");
    }
    Ok(None)
}

/// `graft fleet ...`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Members, last seen, examples per class, and whether they hold the same examples.
    Status {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Seconds to collect heartbeats.
        #[arg(long, default_value_t = 2.0)]
        wait: f64,
    },
    /// Scale simulation: KIOSKS in-process clients × EXAMPLES each through the broker, until
    /// every client holds every example. Use a fresh --fleet-name: the examples stay retained.
    Simulate {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Simulated kiosks.
        #[arg(long, default_value_t = 100)]
        kiosks: usize,
        /// Examples each kiosk learns.
        #[arg(long, default_value_t = 1000)]
        examples: usize,
        /// Values per embedding.
        #[arg(long, default_value_t = 1280)]
        dim: usize,
        /// The broker's process id (its memory is reported).
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// Each kiosk learns this many examples a second [default: all at once].
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[cfg(not(feature = "fleet"))]
pub fn run(_g: &Global, _c: FleetCommand) -> anyhow::Result<()> {
    bail!("this graft was built without fleets: build it with `--features fleet`")
}

#[cfg(feature = "fleet")]
pub fn run(g: &Global, c: FleetCommand) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    use std::time::Duration;
    let seconds = |s: f64, what: &str| -> anyhow::Result<Duration> {
        if !(s.is_finite() && s > 0.0 && s < 1e6) {
            bail!("--{what} {s} is not a number of seconds");
        }
        Ok(Duration::from_secs_f64(s))
    };
    let need = |f: &FleetArgs| -> anyhow::Result<graft::fleet::FleetConfig> {
        f.config()?
            .ok_or_else(|| anyhow::anyhow!("give the broker: --fleet mqtt://HOST[:PORT]"))
    };
    match c {
        FleetCommand::Status { fleet, wait } => {
            let s = graft::fleet::status(&need(&fleet)?, seconds(wait, "wait")?)?;
            if g.json {
                return super::output::json_line(&s);
            }
            let mut out = String::new();
            writeln!(
                out,
                "fleet {}: {} members, {}",
                s.fleet,
                s.members.len(),
                if s.converged {
                    "the online ones hold the same examples".to_string()
                } else {
                    format!("diverged: {}", s.diverged.join(", "))
                }
            )?;
            for m in &s.members {
                let st = &m.status;
                let classes: Vec<String> =
                    st.classes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                writeln!(
                    out,
                    "  {:<28} {:<8} seen {:>6.1} s ago  {:>5} examples  digest {}  {}  [{}]{}",
                    st.kiosk,
                    if m.online { "online" } else { "offline" },
                    m.last_seen_s,
                    st.examples,
                    st.digest,
                    st.model,
                    classes.join(" "),
                    if st.refused > 0 {
                        format!("  refused {}", st.refused)
                    } else {
                        String::new()
                    }
                )?;
            }
            if s.refused > 0 {
                writeln!(
                    out,
                    "  {} heartbeats refused (not signed with this fleet key)",
                    s.refused
                )?;
            }
            super::output::text(&out)
        }
        FleetCommand::Simulate {
            fleet,
            kiosks,
            examples,
            dim,
            broker_pid,
            timeout,
            rate,
        } => {
            if kiosks == 0 || examples == 0 || dim == 0 || dim > graft::kiosk::wire::MAX_DIM {
                bail!("--kiosks, --examples and --dim must be at least 1 (dim at most 65535)");
            }
            let r = graft::fleet::simulate(&graft::fleet::SimOptions {
                config: need(&fleet)?,
                kiosks,
                examples,
                dim,
                broker_pid,
                timeout: seconds(timeout, "timeout")?,
                every: match rate {
                    Some(r) if r.is_finite() && (1e-3..=1e6).contains(&r) => {
                        Some(Duration::from_secs_f64(1.0 / r))
                    }
                    Some(r) => bail!("--rate {r} is not a number of examples a second"),
                    None => None,
                },
            })?;
            if g.json {
                return super::output::json_line(&r);
            }
            let mut out = String::new();
            writeln!(
                out,
                "{} kiosks × {} examples (dim {}): {} of {} kiosks converged in {:.1} s; {:.0} bytes per example published; {} deliveries ({:.0} MB); {:.1} MB per client (peak {:.1}){}",
                r.kiosks,
                r.examples_each,
                r.dim,
                r.converged_kiosks,
                r.kiosks,
                r.converge_s,
                r.bytes_per_example,
                r.deliveries,
                r.delivered_mb,
                r.client_mb_per_kiosk,
                r.client_peak_mb_per_kiosk,
                r.broker_mb
                    .map(|(now, peak)| format!("; broker {now:.0} MB (peak {peak:.0} MB)"))
                    .unwrap_or_default()
            )?;
            if r.connection_errors > 0 {
                writeln!(
                    out,
                    "{} connection errors; the last: {}",
                    r.connection_errors,
                    r.last_error.as_deref().unwrap_or("?")
                )?;
            }
            super::output::text(&out)?;
            if r.converged_kiosks < r.kiosks {
                bail!(
                    "{} kiosks did not converge within {timeout} s",
                    r.kiosks - r.converged_kiosks
                );
            }
            Ok(())
        }
    }
}

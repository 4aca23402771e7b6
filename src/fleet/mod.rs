//! Fleets: kiosks that learn together through an MQTT broker (feature `fleet`; docs/FLEET.md).
//! This module owns `rumqttc` and `rustls`; what travels and how it merges is
//! [`crate::kiosk::wire`] and [`crate::kiosk::replica`], pure code.
//!
//! ```text
//! topics (all retained, QoS 1, under graft/FLEET/):
//!   x/ORIGIN/EID   an example: its add, later replaced by its tombstone
//!   l/ORIGIN/HLC   a FORGET or a rename
//!   m/KIOSK        a member's heartbeat (every 10 s, and after each change)
//! ```
//!
//! Each kiosk is one MQTT client with a persistent session (`clean_session = false`), so the
//! broker queues what it misses while offline. At every connection it subscribes to
//! `graft/FLEET/#` (the retained examples bring a new kiosk, or one whose session the broker
//! lost, the whole fleet) and publishes its own operations again (a broker that lost its
//! retained messages gets them back). Every message carries a tag made with the fleet key:
//! a client with access to the broker but not the key cannot add, delete or rename anything.

mod sim;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Client, ConnectionError, Event, MqttOptions, Packet, QoS, Transport};

use crate::kiosk::wire::{self, MemberStatus, Message};
use crate::kiosk::{Handle, Op, Outbox, Outgoing};

pub use sim::{simulate, SimOptions, SimReport};

/// Fleet failures: the broker's address, the TLS files, the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The broker's address is not `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    #[error("fleet broker {url:?}: {why} (expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT])")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The fleet's name or a kiosk id cannot be part of a topic.
    #[error("{what} {name:?}: use 1-100 of A-Z a-z 0-9 . _ - (no leading dot)")]
    BadName {
        /// Which name.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The fleet key is too short to be a secret.
    #[error(
        "the fleet key has {0} bytes; give at least 16 (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    ShortKey(usize),
    /// A certificate file could not be read or holds no certificate.
    #[error("{path}: {why}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// No answer from the broker.
    #[error("fleet broker {url}: {why}")]
    Broker {
        /// Its address.
        url: String,
        /// What happened.
        why: String,
    },
}

/// How a kiosk (or `graft fleet status`) reaches its fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883, TLS).
    pub url: String,
    /// The fleet's name: its topics are `graft/NAME/...`.
    pub name: String,
    /// The fleet key every message is authenticated with.
    pub key: Vec<u8>,
    /// Broker user name and password, if the broker asks for them.
    pub login: Option<(String, String)>,
    /// CA certificates (PEM) for `mqtts://` [default: the system's].
    pub ca: Option<PathBuf>,
}

impl FleetConfig {
    /// Checks the name and key and parses the address: (TLS, host, port).
    pub fn check(&self) -> Result<(bool, String, u16), FleetError> {
        if !wire::valid_name(&self.name) || self.name.contains('~') {
            return Err(FleetError::BadName {
                what: "fleet name",
                name: self.name.clone(),
            });
        }
        if self.key.len() < 16 {
            return Err(FleetError::ShortKey(self.key.len()));
        }
        let bad = |why: &str| FleetError::BadUrl {
            url: self.url.clone(),
            why: why.into(),
        };
        let (tls, rest) = if let Some(r) = self.url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = self.url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(bad("unknown scheme"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(&format!("port {p:?} is not a number")))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(bad("no host"));
        }
        Ok((tls, host.to_string(), port))
    }

    fn options(&self, client_id: &str, clean: bool) -> Result<MqttOptions, FleetError> {
        let (tls, host, port) = self.check()?;
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_clean_session(clean);
        // An example of a NAME:top model carries 15,680 values.
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        o.set_request_channel_capacity(4096);
        if let Some((u, p)) = &self.login {
            o.set_credentials(u.clone(), p.clone());
        }
        if tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(self.ca.as_deref())?)),
            ));
        }
        Ok(o)
    }
}

fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, FleetError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let err = |why: String| FleetError::Tls {
                path: path.to_path_buf(),
                why,
            };
            let bytes = crate::userfile::read(path).map_err(|e| err(e.to_string()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut bytes.as_slice()) {
                let cert = cert.map_err(|e| err(format!("not a PEM certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(err("holds no PEM certificate".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(FleetError::Tls {
                    path: PathBuf::from("the system's CA certificates"),
                    why: "none found; give --fleet-ca FILE".into(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Tls {
            path: PathBuf::from("TLS"),
            why: e.to_string(),
        })
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

enum Inbox {
    Local(Outgoing),
    Mqtt(Result<Event, ConnectionError>),
}

/// Polls a connection on a thread of its own (rumqttc's event loop), forwarding its events;
/// after an error it waits before the next attempt, so a broker that is down is retried every
/// `retry`, not in a busy loop. Ends when the client is dropped or `tx`'s receiver is.
fn poll_thread(mut connection: rumqttc::Connection, tx: mpsc::Sender<Inbox>, retry: Duration) {
    std::thread::spawn(move || {
        for ev in connection.iter() {
            let failed = ev.is_err();
            if tx.send(Inbox::Mqtt(ev)).is_err() {
                break;
            }
            if failed {
                std::thread::sleep(retry);
            }
        }
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often a member's heartbeat is published when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A member whose heartbeat is older than this is shown offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(35);

/// Connects kiosk `kiosk` to its fleet: returns the [`Outbox`] to give
/// [`Server::join_fleet`](crate::kiosk::Server::join_fleet) and the front end to serve beside
/// the others (it runs until `stop` is set).
pub fn connect(
    config: FleetConfig,
    kiosk: &str,
    stop: Arc<AtomicBool>,
) -> Result<(Outbox, crate::kiosk::hub::Front<'static>), FleetError> {
    if !wire::valid_name(kiosk) || kiosk.contains('~') {
        return Err(FleetError::BadName {
            what: "kiosk id",
            name: kiosk.to_string(),
        });
    }
    let options = config.options(&format!("graft-{}-{kiosk}", config.name), false)?;
    let (tx, rx) = mpsc::channel::<Inbox>();
    let local = tx.clone();
    let outbox: Outbox = Box::new(move |o| {
        let _ = local.send(Inbox::Local(o));
    });
    let kiosk = kiosk.to_string();
    let front = Box::new(move |handle: Handle| {
        let (client, connection) = Client::new(options, 4096);
        poll_thread(connection, tx, Duration::from_millis(500));
        Link::new(config, kiosk, client).run(&rx, &handle, &stop);
    });
    Ok((outbox, front))
}

/// The transport's state on its thread.
struct Link {
    config: FleetConfig,
    me: String,
    client: Client,
    connected: bool,
    /// This kiosk's operations, sealed, by topic (a tombstone replaces its add).
    own: BTreeMap<String, Vec<u8>>,
    /// Messages accepted by no publish yet (the request queue was full or the link down).
    pending: VecDeque<(String, Vec<u8>)>,
    status: Option<MemberStatus>,
    status_dirty: bool,
    status_sent: Instant,
    batch: Vec<crate::kiosk::replica::FleetOp>,
    batch_since: Instant,
    refused: u64,
    last_warning: HashMap<String, Instant>,
}

impl Link {
    fn new(config: FleetConfig, me: String, client: Client) -> Link {
        Link {
            config,
            me,
            client,
            connected: false,
            own: BTreeMap::new(),
            pending: VecDeque::new(),
            status: None,
            status_dirty: false,
            status_sent: Instant::now(),
            batch: Vec::new(),
            batch_since: Instant::now(),
            refused: 0,
            last_warning: HashMap::new(),
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Inbox>, handle: &Handle, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Inbox::Local(Outgoing::Ops(ops))) => {
                    for op in ops {
                        let topic = wire::topic(&self.config.name, &op);
                        let sealed = self.seal(&topic, &wire::encode(&op));
                        self.own.insert(topic.clone(), sealed.clone());
                        self.pending.push_back((topic, sealed));
                    }
                }
                Ok(Inbox::Local(Outgoing::Status(s))) => {
                    self.status = Some(s);
                    self.status_dirty = true;
                }
                Ok(Inbox::Mqtt(ev)) => self.event(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush();
            if !self.batch.is_empty()
                && (self.batch_since.elapsed() >= Duration::from_millis(30)
                    || self.batch.len() >= 2000)
            {
                let ops = std::mem::take(&mut self.batch);
                let n = ops.len();
                let reply = handle.call(Op::Fleet(ops), Duration::from_secs(600));
                if let Err((code, message)) = &reply.result {
                    log::warn!(
                        "fleet: {n} operations not applied ({} {message})",
                        code.number()
                    );
                }
            }
            self.heartbeat();
        }
        if self.connected {
            let _ = self.client.try_disconnect();
        }
    }

    fn seal(&self, topic: &str, body: &[u8]) -> Vec<u8> {
        wire::seal(&self.config.key, &self.config.name, topic, body)
    }

    /// Publishes what waits, as far as the client's queue takes it.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        while let Some((topic, payload)) = self.pending.pop_front() {
            if let Err(e) =
                self.client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload.clone())
            {
                log::debug!("fleet: publish deferred: {e}");
                self.pending.push_front((topic, payload));
                break;
            }
        }
    }

    fn heartbeat(&mut self) {
        if !self.connected {
            return;
        }
        let due = self.status_sent.elapsed() >= HEARTBEAT
            || (self.status_dirty && self.status_sent.elapsed() >= Duration::from_millis(200));
        let Some(s) = self.status.as_mut().filter(|_| due) else {
            return;
        };
        s.time_ms = now_ms();
        let mut s = s.clone();
        s.refused += self.refused;
        let topic = wire::status_topic(&self.config.name, &self.me);
        let payload = self.seal(&topic, &wire::encode_status(&s));
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            self.status_dirty = false;
            self.status_sent = Instant::now();
        }
    }

    fn event(&mut self, ev: Result<Event, ConnectionError>) {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                log::info!(
                    "fleet {}: connected to {} as {} (session {})",
                    self.config.name,
                    self.config.url,
                    self.me,
                    if ack.session_present { "kept" } else { "new" }
                );
                self.connected = true;
                if let Err(e) = self
                    .client
                    .try_subscribe(wire::fleet_filter(&self.config.name), QoS::AtLeastOnce)
                {
                    log::warn!("fleet: subscribe: {e}");
                }
                // The broker may have lost them (restarted without persistence): again.
                self.pending = self
                    .own
                    .iter()
                    .map(|(t, p)| (t.clone(), p.clone()))
                    .collect();
                self.status_dirty = true;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => self.received(&p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                if self.connected {
                    log::warn!(
                        "fleet {}: lost {} ({e}); working offline, reconnecting",
                        self.config.name,
                        self.config.url
                    );
                } else {
                    log::debug!("fleet: {e}");
                }
                self.connected = false;
            }
        }
    }

    fn received(&mut self, topic: &str, payload: &[u8]) {
        let prefix = format!("graft/{}/", self.config.name);
        let Some(rest) = topic.strip_prefix(&prefix) else {
            return;
        };
        // Heartbeats are for `graft fleet status`; an empty retained message clears a topic.
        if rest.starts_with("m/") || payload.is_empty() {
            return;
        }
        // Our own operations echoed back (MQTT 3.1.1 has no "no local").
        if self.own.get(topic).is_some_and(|p| p.as_slice() == payload) {
            return;
        }
        match wire::open(&self.config.key, &self.config.name, topic, payload) {
            Ok(Message::Op(op)) if topic.split('/').nth(3) == Some(op.stamp.origin.as_str()) => {
                if self.batch.is_empty() {
                    self.batch_since = Instant::now();
                }
                self.batch.push(op);
            }
            Ok(_) => self.refuse(topic, "its origin is not its topic's"),
            Err(e) => self.refuse(topic, &e.to_string()),
        }
    }

    /// Counts a refused message and says so, once a minute per sender at most.
    fn refuse(&mut self, topic: &str, why: &str) {
        self.refused += 1;
        let who = topic.split('/').nth(3).unwrap_or("?").to_string();
        let quiet = self
            .last_warning
            .get(&who)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if !quiet {
            log::warn!("fleet: refused a message on {topic}: {why}");
            self.last_warning.insert(who, Instant::now());
        }
    }
}

/// What `graft fleet status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStatus {
    /// The fleet's name.
    pub fleet: String,
    /// Each member's last heartbeat, and whether it is recent.
    pub members: Vec<MemberView>,
    /// Whether every online member with the same backbone holds the same examples.
    pub converged: bool,
    /// Members whose examples differ from the most common digest among the online ones.
    pub diverged: Vec<String>,
    /// Heartbeats refused (wrong key, malformed).
    pub refused: u64,
}

/// One member in [`FleetStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberView {
    /// Its heartbeat.
    #[serde(flatten)]
    pub status: MemberStatus,
    /// Seconds since its heartbeat was sent.
    pub last_seen_s: f64,
    /// Seen within [`OFFLINE_AFTER`].
    pub online: bool,
}

/// Reads the members' heartbeats (retained on the broker) for up to `wait`, and compares them.
pub fn status(config: &FleetConfig, wait: Duration) -> Result<FleetStatus, FleetError> {
    let id = format!("graft-status-{:08x}", rand::random::<u32>());
    let options = config.options(&id, true)?;
    let (client, connection) = Client::new(options, 64);
    let (tx, rx) = mpsc::channel();
    poll_thread(connection, tx, Duration::from_millis(200));
    let start = Instant::now();
    let mut members: BTreeMap<String, MemberStatus> = BTreeMap::new();
    let mut refused = 0;
    let mut connected = false;
    let mut last_error = String::from("no answer");
    let filter = format!("graft/{}/m/+", config.name);
    while start.elapsed() < wait {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::ConnAck(_))))) => {
                connected = true;
                let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
            }
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::Publish(p))))) => {
                match wire::open(&config.key, &config.name, &p.topic, &p.payload) {
                    Ok(Message::Status(s)) if p.topic.ends_with(&format!("/m/{}", s.kiosk)) => {
                        members.insert(s.kiosk.clone(), s);
                    }
                    _ => refused += 1,
                }
            }
            Ok(Inbox::Mqtt(Err(e))) => last_error = e.to_string(),
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    if !connected {
        return Err(FleetError::Broker {
            url: config.url.clone(),
            why: last_error,
        });
    }
    Ok(compare(
        &config.name,
        members.into_values().collect(),
        refused,
        now_ms(),
    ))
}

/// Members, their age at `now`, and who differs from the majority of the online ones.
pub fn compare(fleet: &str, members: Vec<MemberStatus>, refused: u64, now: u64) -> FleetStatus {
    let members: Vec<MemberView> = members
        .into_iter()
        .map(|s| {
            let age = now.saturating_sub(s.time_ms) as f64 / 1000.0;
            MemberView {
                online: age <= OFFLINE_AFTER.as_secs_f64(),
                last_seen_s: age,
                status: s,
            }
        })
        .collect();
    let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
    for m in members.iter().filter(|m| m.online) {
        *counts
            .entry((&m.status.backbone, &m.status.digest))
            .or_default() += 1;
    }
    // Per backbone, the most common digest (ties: the smallest, so the answer is stable).
    let mut best: HashMap<&str, (usize, &str)> = HashMap::new();
    for ((bb, digest), n) in &counts {
        let e = best.entry(bb).or_insert((*n, digest));
        if (*n, std::cmp::Reverse(*digest)) > (e.0, std::cmp::Reverse(e.1)) {
            *e = (*n, digest);
        }
    }
    let diverged: Vec<String> = members
        .iter()
        .filter(|m| m.online)
        .filter(|m| best.get(m.status.backbone.as_str()).map(|b| b.1) != Some(&m.status.digest))
        .map(|m| m.status.kiosk.clone())
        .collect();
    FleetStatus {
        fleet: fleet.to_string(),
        converged: diverged.is_empty(),
        diverged,
        members,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> FleetConfig {
        FleetConfig {
            url: url.into(),
            name: "shop".into(),
            key: vec![1; 16],
            login: None,
            ca: None,
        }
    }

    #[test]
    fn broker_addresses() {
        assert_eq!(
            config("mqtt://broker.lan").check().unwrap(),
            (false, "broker.lan".into(), 1883)
        );
        assert_eq!(
            config("mqtts://10.0.0.2:9000/").check().unwrap(),
            (true, "10.0.0.2".into(), 9000)
        );
        assert_eq!(
            config("mqtt://[::1]:1884").check().unwrap(),
            (false, "::1".into(), 1884)
        );
        for bad in ["http://x", "mqtt://", "mqtt://h:port", "mqtt://u@h"] {
            assert!(config(bad).check().is_err(), "{bad}");
        }
        let mut c = config("mqtt://h");
        c.key = vec![1; 8];
        assert!(matches!(c.check(), Err(FleetError::ShortKey(8))));
        c.key = vec![1; 16];
        c.name = "a/b".into();
        assert!(matches!(c.check(), Err(FleetError::BadName { .. })));
    }

    #[test]
    fn divergence_is_against_the_online_majority() {
        let m = |k: &str, digest: &str, age_s: u64| MemberStatus {
            kiosk: k.into(),
            model: "m".into(),
            backbone: "bb".into(),
            time_ms: 100_000 - age_s * 1000,
            examples: 3,
            classes: BTreeMap::new(),
            digest: digest.into(),
            ops: 3,
            refused: 0,
        };
        let s = compare(
            "shop",
            vec![
                m("a", "x", 1),
                m("b", "x", 2),
                m("c", "y", 3),
                m("d", "z", 99),
            ],
            0,
            100_000,
        );
        assert!(!s.converged);
        assert_eq!(s.diverged, vec!["c".to_string()]);
        assert!(!s.members[3].online, "d is offline, not diverged");
        let s = compare("shop", vec![m("a", "x", 1), m("b", "x", 2)], 0, 100_000);
        assert!(s.converged);
    }
}

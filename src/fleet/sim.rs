//! The scale simulation (`graft fleet simulate`): many kiosks as in-process MQTT clients, each
//! a real client with its own connection and a [`Replica`], publishing examples through one
//! broker until every one of them holds all of them.

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rumqttc::{Client, Event, Packet, QoS};

use super::{poll_thread, FleetConfig, FleetError, Inbox};
use crate::kiosk::replica::{Body, FleetOp, Replica, Stamp};
use crate::kiosk::wire::{self, Message};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The broker and fleet (the fleet name should be fresh: retained examples stay).
    pub config: FleetConfig,
    /// Kiosks (one MQTT client each).
    pub kiosks: usize,
    /// Examples each kiosk learns.
    pub examples: usize,
    /// Values per embedding (1280 for the default backbone).
    pub dim: usize,
    /// The broker's process id, to read its memory.
    pub broker_pid: Option<u32>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Each kiosk learns one example per this interval (kiosks learning over time, and time
    /// for the network to fail meanwhile); `None`: all at once.
    pub every: Option<Duration>,
}

/// What the simulation measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// Kiosks.
    pub kiosks: usize,
    /// Examples each.
    pub examples_each: usize,
    /// Values per embedding.
    pub dim: usize,
    /// Seconds from the start of publishing until every kiosk held every example.
    pub converge_s: f64,
    /// Kiosks that held every example (and the same digest) by then.
    pub converged_kiosks: usize,
    /// Bytes of one example's MQTT PUBLISH (header, topic, body, tag), on average.
    pub bytes_per_example: f64,
    /// Deliveries the broker made (examples × subscribers, duplicates included).
    pub deliveries: u64,
    /// Megabytes the broker sent to the kiosks.
    pub delivered_mb: f64,
    /// This process's resident memory at the end, per simulated kiosk (MB).
    pub client_mb_per_kiosk: f64,
    /// Its peak, per simulated kiosk (MB): messages wait in each client's queue while the
    /// machine's cores are busy.
    pub client_peak_mb_per_kiosk: f64,
    /// The broker's resident memory at the end and its peak (MB), when its pid was given.
    pub broker_mb: Option<(f64, f64)>,
    /// Connection errors, all kiosks together: each lost connection and each failed attempt
    /// to make it again.
    pub connection_errors: u64,
    /// The last connection error a kiosk saw, if any.
    pub last_error: Option<String>,
}

fn rss_mb(pid: &str) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<f64> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    };
    Some((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// One simulated kiosk's result.
struct Done {
    held: usize,
    connection_errors: u64,
    last_error: Option<String>,
    digest: String,
    deliveries: u64,
    delivered: u64,
    published_bytes: u64,
    finished: Instant,
}

/// Runs the simulation; every kiosk must end with `kiosks × examples` examples.
pub fn simulate(o: &SimOptions) -> Result<SimReport, FleetError> {
    o.config.check()?;
    let total = o.kiosks * o.examples;
    let start_line = Arc::new(Barrier::new(o.kiosks + 1));
    let (done_tx, done_rx) = mpsc::channel::<Result<Done, FleetError>>();
    let backbone = [0x5a; 8];
    for k in 0..o.kiosks {
        let options = o
            .config
            .options(&format!("graft-sim-{}-{k}", o.config.name), true)?;
        let (config, start_line, done_tx) =
            (o.config.clone(), Arc::clone(&start_line), done_tx.clone());
        let (examples, dim, timeout, every) = (o.examples, o.dim, o.timeout, o.every);
        std::thread::spawn(move || {
            let r = kiosk(
                k,
                options,
                &config,
                &start_line,
                examples,
                dim,
                total,
                backbone,
                timeout,
                every,
            );
            let _ = done_tx.send(r);
        });
    }
    drop(done_tx);
    start_line.wait();
    let started = Instant::now();
    let mut results = Vec::new();
    for r in done_rx {
        results.push(r?);
    }
    let (process, peak) = rss_mb("self").unwrap_or((0.0, 0.0));
    let full: Vec<&Done> = results.iter().filter(|d| d.held == total).collect();
    let digest = full.first().map(|d| d.digest.clone());
    let converged = full
        .iter()
        .filter(|d| Some(&d.digest) == digest.as_ref())
        .count();
    let end = results.iter().map(|d| d.finished).max().unwrap_or(started);
    Ok(SimReport {
        kiosks: o.kiosks,
        examples_each: o.examples,
        dim: o.dim,
        converge_s: end.duration_since(started).as_secs_f64(),
        converged_kiosks: converged,
        bytes_per_example: results.iter().map(|d| d.published_bytes).sum::<u64>() as f64
            / total.max(1) as f64,
        deliveries: results.iter().map(|d| d.deliveries).sum(),
        delivered_mb: results.iter().map(|d| d.delivered).sum::<u64>() as f64 / 1e6,
        client_mb_per_kiosk: process / o.kiosks.max(1) as f64,
        client_peak_mb_per_kiosk: peak / o.kiosks.max(1) as f64,
        broker_mb: o.broker_pid.and_then(|p| rss_mb(&p.to_string())),
        connection_errors: results.iter().map(|d| d.connection_errors).sum(),
        last_error: results.iter().rev().find_map(|d| d.last_error.clone()),
    })
}

#[allow(clippy::too_many_arguments)]
fn kiosk(
    k: usize,
    options: rumqttc::MqttOptions,
    config: &FleetConfig,
    start_line: &Barrier,
    examples: usize,
    dim: usize,
    total: usize,
    backbone: [u8; 8],
    timeout: Duration,
    every: Option<Duration>,
) -> Result<Done, FleetError> {
    let me = format!("sim{k}");
    let (client, connection) = Client::new(options, 4096);
    let (tx, rx) = mpsc::channel();
    poll_thread(connection, tx, Duration::from_millis(200));
    // Examples only (the simulation publishes no heartbeats).
    let examples_filter = format!("graft/{}/x/#", config.name);
    let broker = |why: String| FleetError::Broker {
        url: config.url.clone(),
        why,
    };
    // Connected and subscribed before anyone publishes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut subscribed = false;
    while !subscribed {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::ConnAck(_))))) => client
                .try_subscribe(examples_filter.clone(), QoS::AtLeastOnce)
                .map_err(|e| broker(e.to_string()))?,
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::SubAck(_))))) => subscribed = true,
            Ok(Inbox::Mqtt(Err(e))) => return Err(broker(e.to_string())),
            Ok(_) => {}
            Err(_) => return Err(broker("no connection within 30 s".into())),
        }
    }
    start_line.wait();
    let mut replica = Replica::in_memory(&me, backbone, false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(k as u64);
    // This kiosk's examples, sealed, in the order it learns them.
    let mut own = Vec::with_capacity(examples);
    let mut published_bytes = 0u64;
    for i in 0..examples {
        let embedding: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>().powi(3) * 4.0).collect();
        let mut sha = [0u8; 32];
        rng.fill(&mut sha);
        let mut eid = [0u8; 16];
        rng.fill(&mut eid);
        let op = FleetOp {
            stamp: Stamp {
                hlc: replica.tick().hlc,
                origin: me.clone(),
            },
            backbone,
            body: Body::Add {
                eid,
                label: format!("class{:02}", i % 20),
                file: format!("class{:02}-1764000000000_{i:03}.jpg", i % 20),
                sha256: sha,
                embedding,
            },
        };
        let topic = wire::topic(&config.name, &op);
        let payload = wire::seal(&config.key, &config.name, &topic, &wire::encode(&op));
        // PUBLISH: fixed header, remaining length, topic length, topic, packet id, payload.
        let rest = 2 + topic.len() + 2 + payload.len();
        published_bytes += (1 + varint_len(rest) + rest) as u64;
        own.push((op, topic, payload));
    }
    // Learned so far (each is merged and published when learned).
    let mut learned = 0;
    let mut queue = std::collections::VecDeque::new();
    // Own examples the broker has not sent back yet: once it has, it holds them (retained), so
    // this kiosk may leave without taking them with it. Leaving as soon as this kiosk held everything lost
    // examples still in its connection's queue (a board build under qemu, CI, 2026-12-03).
    let mut unechoed: std::collections::HashSet<String> =
        own.iter().map(|(_, t, _)| t.clone()).collect();
    let (mut deliveries, mut delivered, mut connection_errors) = (0u64, 0u64, 0u64);
    let mut last_error = None;
    let mut held_all = None;
    let begun = Instant::now();
    let end = begun + timeout;
    while (replica.len() < total || !unechoed.is_empty()) && Instant::now() < end {
        let due = every.map_or(examples, |e| {
            ((begun.elapsed().as_secs_f64() / e.as_secs_f64()) as usize + 1).min(examples)
        });
        while learned < due {
            let (op, topic, payload) = &own[learned];
            replica.merge(op.clone());
            queue.push_back((topic.clone(), payload.clone()));
            learned += 1;
        }
        while let Some((t, p)) = queue.pop_front() {
            if client
                .try_publish(t.clone(), QoS::AtLeastOnce, true, p.clone())
                .is_err()
            {
                queue.push_front((t, p));
                break;
            }
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::Publish(p))))) => {
                deliveries += 1;
                delivered += (p.topic.len() + p.payload.len() + 7) as u64;
                unechoed.remove(p.topic.as_str());
                if let Ok(Message::Op(op)) =
                    wire::open(&config.key, &config.name, &p.topic, &p.payload)
                {
                    replica.merge(op);
                }
            }
            // Connected again: a clean session has no subscription, and what was in flight
            // may be lost; as a kiosk does, subscribe and publish everything learned again.
            Ok(Inbox::Mqtt(Ok(Event::Incoming(Packet::ConnAck(_))))) => {
                client
                    .try_subscribe(examples_filter.clone(), QoS::AtLeastOnce)
                    .map_err(|e| broker(e.to_string()))?;
                queue = own[..learned]
                    .iter()
                    .map(|(_, t, p)| (t.clone(), p.clone()))
                    .collect();
            }
            Ok(Inbox::Mqtt(Err(e))) => {
                connection_errors += 1;
                last_error = Some(e.to_string());
            }
            _ => {}
        }
        if held_all.is_none() && replica.len() == total {
            held_all = Some(Instant::now());
        }
    }
    let finished = held_all.unwrap_or_else(Instant::now);
    let digest = replica.summary().2;
    let _ = client.try_disconnect();
    Ok(Done {
        held: replica.len(),
        connection_errors,
        last_error,
        digest,
        deliveries,
        delivered,
        published_bytes,
        finished,
    })
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

//! A host-side client for `graft serve`: sends requests, prints replies (and events).
//!
//! ```sh
//! cargo run --example kiosk_client -- /dev/ttyUSB0 PING "LEARN cup 5" CLASSIFY
//! cargo run --example kiosk_client -- tcp:127.0.0.1:7070 INFO "STREAM ON 500" wait:5 "STREAM OFF"
//! ```
//!
//! `wait:N` prints whatever arrives (e.g. `EVT` lines) for N seconds.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(target) = args.next() else {
        eprintln!("usage: kiosk_client (/dev/ttyX | tcp:HOST:PORT) REQUEST...");
        std::process::exit(2);
    };
    let mut link: Box<dyn ReadWrite> = match target.strip_prefix("tcp:") {
        Some(addr) => {
            let s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Box::new(s)
        }
        None => Box::new(graft::serial::open(&graft::serial::SerialConfig {
            path: target.clone(),
            baud: 115_200,
            framing: Default::default(),
            flow: Default::default(),
        })?),
    };
    let mut pending = Vec::new();
    for request in args {
        if let Some(secs) = request.strip_prefix("wait:") {
            let until = Instant::now() + Duration::from_secs_f64(secs.parse()?);
            while Instant::now() < until {
                if let Some(line) = read_line(&mut link, &mut pending, until)? {
                    println!("{line}");
                }
            }
            continue;
        }
        link.write_all(format!("{request}\n").as_bytes())?;
        println!("> {request}");
        // Print lines until the reply (events may come first).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match read_line(&mut link, &mut pending, deadline)? {
                Some(line) if line.starts_with("EVT") => println!("{line}"),
                Some(line) => {
                    println!("< {line}");
                    break;
                }
                None => return Err(format!("no reply to {request:?} within 60 s").into()),
            }
        }
    }
    Ok(())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn read_line(
    link: &mut Box<dyn ReadWrite>,
    pending: &mut Vec<u8>,
    deadline: Instant,
) -> std::io::Result<Option<String>> {
    loop {
        if let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            return Ok(Some(String::from_utf8_lossy(&line).trim_end().to_string()));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        let mut buf = [0u8; 512];
        match link.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

//! Serial ports (UART, USB-serial adapters) for the kiosk protocol: the only module that touches
//! `serialport`. Built without libudev, so it cross-compiles; ports are named by path.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;
use std::time::Duration;

use serialport::{DataBits, FlowControl, Parity, SerialPort, StopBits, TTYPort};

/// How long a read waits before returning a timeout, so the server can notice silence, stream
/// frames and stop.
pub const READ_TIMEOUT: Duration = Duration::from_millis(50);

/// Serial port failures, naming the port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// No such device.
    #[error("serial port {path} not found (is the adapter plugged in? try ls /dev/ttyUSB* /dev/ttyACM* /dev/serial0)")]
    NotFound {
        /// The path.
        path: String,
    },
    /// No permission.
    #[error("permission denied opening {path}: add the user to the `dialout` group (`sudo usermod -aG dialout $USER`, then log in again)")]
    PermissionDenied {
        /// The path.
        path: String,
    },
    /// Another program has it open.
    #[error("serial port {path} is busy (open in another program?)")]
    Busy {
        /// The path.
        path: String,
    },
    /// A setting the port refused, or one that does not parse.
    #[error("serial port {path}: {message}")]
    Setting {
        /// The path.
        path: String,
        /// Why.
        message: String,
    },
    /// A setting string that does not parse.
    #[error("{0}")]
    Parse(String),
}

/// Data bits, parity, stop bits, e.g. `8N1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// 5–8.
    pub data_bits: u8,
    /// `N`, `E` or `O`.
    pub parity: char,
    /// 1 or 2.
    pub stop_bits: u8,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            data_bits: 8,
            parity: 'N',
            stop_bits: 1,
        }
    }
}

impl FromStr for Framing {
    type Err = SerialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SerialError::Parse(format!("framing {s:?}: expected like 8N1, 7E1, 8O2"));
        let b = s.trim().as_bytes();
        if b.len() != 3 {
            return Err(bad());
        }
        let data_bits = (b[0] as char).to_digit(10).ok_or_else(bad)? as u8;
        let parity = (b[1] as char).to_ascii_uppercase();
        let stop_bits = (b[2] as char).to_digit(10).ok_or_else(bad)? as u8;
        if !(5..=8).contains(&data_bits) || !"NEO".contains(parity) || !(1..=2).contains(&stop_bits)
        {
            return Err(bad());
        }
        Ok(Framing {
            data_bits,
            parity,
            stop_bits,
        })
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.data_bits, self.parity, self.stop_bits)
    }
}

/// Flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flow {
    /// None (3-wire UART).
    #[default]
    None,
    /// RTS/CTS.
    Hardware,
    /// XON/XOFF.
    Software,
}

impl FromStr for Flow {
    type Err = SerialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Flow::None),
            "hardware" | "rtscts" => Ok(Flow::Hardware),
            "software" | "xonxoff" => Ok(Flow::Software),
            _ => Err(SerialError::Parse(format!(
                "flow control {s:?}: expected none, hardware or software"
            ))),
        }
    }
}

/// Everything needed to open a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Device path (`/dev/serial0`, `/dev/ttyUSB0`, `/dev/ttyACM0`).
    pub path: String,
    /// Baud rate.
    pub baud: u32,
    /// Data / parity / stop bits.
    pub framing: Framing,
    /// Flow control.
    pub flow: Flow,
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} flow {:?}",
            self.path, self.baud, self.framing, self.flow
        )
    }
}

/// An open serial port: bytes in and out, reads time out after [`READ_TIMEOUT`].
pub struct SerialLink {
    port: TTYPort,
}

impl std::fmt::Debug for SerialLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SerialLink({:?})", self.port.name())
    }
}

fn classify(path: &str, e: serialport::Error) -> SerialError {
    let msg = e.to_string();
    let lower = msg.to_ascii_lowercase();
    match e.kind() {
        serialport::ErrorKind::Io(std::io::ErrorKind::NotFound) => {
            SerialError::NotFound { path: path.into() }
        }
        serialport::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
            SerialError::PermissionDenied { path: path.into() }
        }
        _ if lower.contains("no such file") => SerialError::NotFound { path: path.into() },
        _ if lower.contains("permission denied") => {
            SerialError::PermissionDenied { path: path.into() }
        }
        _ if lower.contains("busy") || lower.contains("would block") => {
            SerialError::Busy { path: path.into() }
        }
        _ => SerialError::Setting {
            path: path.into(),
            message: msg,
        },
    }
}

/// Opens a port (exclusively: a second `graft serve` on it gets "busy").
pub fn open(config: &SerialConfig) -> Result<SerialLink, SerialError> {
    let f = config.framing;
    let builder = serialport::new(&config.path, config.baud)
        .data_bits(match f.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .parity(match f.parity {
            'E' => Parity::Even,
            'O' => Parity::Odd,
            _ => Parity::None,
        })
        .stop_bits(if f.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(match config.flow {
            Flow::None => FlowControl::None,
            Flow::Hardware => FlowControl::Hardware,
            Flow::Software => FlowControl::Software,
        })
        .timeout(READ_TIMEOUT);
    let port = builder
        .open_native()
        .map_err(|e| classify(&config.path, e))?;
    Ok(SerialLink { port })
}

impl SerialLink {
    /// A connected pseudo-terminal pair: `(host end, path of the device end)`. The device end is
    /// what `graft serve --serial PATH` opens; tests and demos talk through the host end.
    pub fn pty_pair() -> Result<(SerialLink, String), SerialError> {
        let (mut master, slave) = TTYPort::pair().map_err(|e| classify("pty", e))?;
        let name = slave.name().ok_or_else(|| SerialError::Setting {
            path: "pty".into(),
            message: "pseudo-terminal has no name".into(),
        })?;
        master
            .set_timeout(READ_TIMEOUT)
            .map_err(|e| classify(&name, e))?;
        drop(slave);
        Ok((SerialLink { port: master }, name))
    }
}

impl Read for SerialLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.port.read(buf)
    }
}

impl Write for SerialLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.port.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.port.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_and_flow_parse() {
        assert_eq!("8n1".parse::<Framing>().unwrap(), Framing::default());
        assert_eq!("7E2".parse::<Framing>().unwrap().to_string(), "7E2");
        for bad in ["8N", "9N1", "8X1", "8N3", ""] {
            assert!(bad.parse::<Framing>().is_err(), "{bad}");
        }
        assert_eq!("RTSCTS".parse::<Flow>().unwrap(), Flow::Hardware);
        assert!("maybe".parse::<Flow>().is_err());
    }

    #[test]
    fn missing_port_is_named() {
        let cfg = SerialConfig {
            path: "/dev/graft-no-such-port".into(),
            baud: 115_200,
            framing: Framing::default(),
            flow: Flow::None,
        };
        let e = open(&cfg).unwrap_err();
        assert!(matches!(e, SerialError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("/dev/graft-no-such-port"));
    }

    fn read_n(link: &mut SerialLink, n: usize) -> Vec<u8> {
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        while got.len() < n {
            match link.read(&mut buf) {
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn a_pty_pair_carries_bytes_both_ways() {
        let (mut host, path) = SerialLink::pty_pair().unwrap();
        let mut dev = open(&SerialConfig {
            path,
            baud: 115_200,
            framing: Framing::default(),
            flow: Flow::None,
        })
        .unwrap();
        host.write_all(b"PING\n").unwrap();
        assert_eq!(read_n(&mut dev, 5), b"PING\n");
        dev.write_all(b"OK\n").unwrap();
        let got = read_n(&mut host, 3);
        assert_eq!(got, b"OK\n");
    }
}

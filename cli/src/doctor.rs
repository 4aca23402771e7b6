//! `graft doctor`: checks what a kiosk needs — model intact, camera and serial port present and
//! accessible, group membership, a writable data folder with free space, the board profile.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::{output, Global};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Camera device to check [default: the board profile's, else /dev/video0].
    #[arg(long)]
    camera: Option<String>,
    /// Serial port to check [default: the board profile's].
    #[arg(long)]
    serial: Option<String>,
    /// Data folder to check [default: /var/lib/graft if it exists, else the current folder].
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
}

/// `access(2)` for read + write: the kernel's answer, groups and ACLs included.
fn can_read_write(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
fn free_bytes(path: &Path) -> Result<u64, String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path; `st` is a properly sized, writable statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Names of the groups this process is in (from /proc/self/status and /etc/group).
fn my_groups() -> Vec<String> {
    let gids: Vec<String> = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?;
            gids.iter().any(|g| g == gid).then(|| name.to_string())
        })
        .collect()
}

fn device_check(name: &'static str, path: &str, group: &str, missing: Status) -> Check {
    let p = Path::new(path);
    if !p.exists() {
        return Check {
            check: name,
            status: missing,
            detail: format!("{path} does not exist"),
        };
    }
    match can_read_write(p) {
        Ok(()) => Check {
            check: name,
            status: Status::Ok,
            detail: format!("{path} present, readable and writable"),
        },
        Err(e) => Check {
            check: name,
            status: Status::Fail,
            detail: format!("{path}: {e}: add the user to the `{group}` group"),
        },
    }
}

pub fn run(g: &Global, a: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let board = g.board()?;
    checks.push(match &board {
        Some((b, src)) => Check {
            check: "board",
            status: Status::Ok,
            detail: format!("{} ({}), from {src}", b.name, b.title),
        },
        None => Check {
            check: "board",
            status: Status::Warn,
            detail: "no profile matched: defaults apply (give --board NAME)".into(),
        },
    });
    match super::load_backbone(g) {
        Ok(bb) => {
            checks.push(Check {
                check: "model",
                status: Status::Ok,
                detail: format!(
                    "{} intact (sha256 {}…), loads in {:.0} ms",
                    bb.id().name,
                    &bb.id().sha256[..12],
                    bb.load_time().as_secs_f64() * 1e3
                ),
            });
            checks.push(Check {
                check: "device",
                status: Status::Ok,
                detail: format!(
                    "forward pass on {} (--device {})",
                    bb.engine(),
                    g.device.name()
                ),
            });
        }
        Err(e) => checks.push(Check {
            check: "model",
            status: Status::Fail,
            detail: super::one_line(&e),
        }),
    }
    checks.push(match g.cpu_kernels {
        graft::CpuKernels::Tract => Check {
            check: "cpu kernels",
            status: Status::Ok,
            detail: "tract's for every operator (--cpu-kernels tract)".into(),
        },
        graft::CpuKernels::Graft
        | graft::CpuKernels::Unfused
        | graft::CpuKernels::Vector
        | graft::CpuKernels::Depthwise => match graft::backbone::check_cpu_kernels() {
            Ok(k) => Check {
                check: "cpu kernels",
                status: Status::Ok,
                detail: format!(
                    "graft's depthwise (planes and channel-blocked), 1x1 and matrix-vector kernels ({}){} and int8 1x1 kernel ({}) match tract's on {} + {}{} + {} operators (largest difference {:.1e} relative){}",
                    k.isa,
                    match k.matrix_unit {
                        Some(unit) => format!(
                            ", 1x1 kernel on the matrix unit ({unit}, within {:.1e} relative: 16-bit products)",
                            k.matrix_max_rel_error
                        ),
                        None => String::new(),
                    },
                    k.int8_isa,
                    k.convolutions,
                    k.pointwise,
                    match k.matrix {
                        0 => String::new(),
                        n => format!(" + {n}"),
                    },
                    k.int8,
                    k.max_rel_error,
                    if k.isa == "scalar" {
                        "; no vectorised kernel for this CPU, so the plan keeps tract's"
                    } else {
                        ""
                    }
                ),
            },
            Err(e) => Check {
                check: "cpu kernels",
                status: Status::Fail,
                detail: format!("{e}; run with --cpu-kernels tract"),
            },
        },
    });
    let camera = a
        .camera
        .clone()
        .or_else(|| board.as_ref().map(|(b, _)| b.camera.device.clone()))
        .unwrap_or_else(|| "/dev/video0".into());
    let mut cam = device_check("camera", &camera, "video", Status::Warn);
    if !cfg!(feature = "camera") {
        cam.status = Status::Warn;
        cam.detail = format!(
            "{}; this graft is built without camera support (--features camera)",
            cam.detail
        );
    }
    checks.push(cam);
    match a
        .serial
        .clone()
        .or_else(|| board.as_ref().map(|(b, _)| b.serial.device.clone()))
    {
        Some(port) => checks.push(device_check("serial", &port, "dialout", Status::Warn)),
        None => checks.push(Check {
            check: "serial",
            status: Status::Warn,
            detail: "no port given and no board profile".into(),
        }),
    }
    let groups = my_groups();
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false);
    for group in ["video", "dialout"] {
        let member = groups.iter().any(|g| g == group);
        checks.push(Check {
            check: if group == "video" {
                "group video"
            } else {
                "group dialout"
            },
            status: if member || root {
                Status::Ok
            } else {
                Status::Warn
            },
            detail: if member {
                format!("member of {group}")
            } else if root {
                format!("running as root (not in {group}; the service user must be)")
            } else {
                format!("not in {group}: sudo usermod -aG {group} $USER, then log in again")
            },
        });
    }
    let data = a.data.clone().unwrap_or_else(|| {
        let var = PathBuf::from("/var/lib/graft");
        if var.is_dir() {
            var
        } else {
            PathBuf::from(".")
        }
    });
    checks.push(match tempfile::NamedTempFile::new_in(&data) {
        Ok(_) => match free_bytes(&data) {
            Ok(free) => Check {
                check: "data folder",
                status: if free < 10_000_000 {
                    Status::Fail
                } else if free < 200_000_000 {
                    Status::Warn
                } else {
                    Status::Ok
                },
                detail: format!(
                    "{} writable, {:.1} GB free",
                    data.display(),
                    free as f64 / 1e9
                ),
            },
            Err(e) => Check {
                check: "data folder",
                status: Status::Warn,
                detail: format!("{} writable; free space unknown: {e}", data.display()),
            },
        },
        Err(e) => Check {
            check: "data folder",
            status: Status::Fail,
            detail: format!("{} not writable: {e}", data.display()),
        },
    });
    checks.push(match graft::kiosk::Secret::load(&data) {
        Ok(Some(secret)) => Check {
            check: "kiosk secret",
            status: Status::Ok,
            detail: format!(
                "{}: {} (the web page's login, docs/HTTP.md; TCP clients AUTH with it, docs/PROTOCOL.md)",
                graft::kiosk::Secret::path(&data).display(),
                secret.reveal()
            ),
        },
        Ok(None) => Check {
            check: "kiosk secret",
            status: Status::Ok,
            detail: format!(
                "none in {} yet (`graft serve --data {}` makes one at its first start)",
                data.display(),
                data.display()
            ),
        },
        Err(e) => Check {
            check: "kiosk secret",
            status: Status::Fail,
            detail: e.to_string(),
        },
    });
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    for c in &checks {
        if g.json {
            output::json_line(c)?;
        } else {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<14} {}", c.check, c.detail);
        }
    }
    if failed > 0 {
        anyhow::bail!("doctor: {failed} check(s) failed");
    }
    Ok(())
}

//! `tern-device cameras` diagnostics without nokhwa: the V4L2 device nodes
//! (`/dev/video*`), whether this user can open each, and if not why and
//! what fixes it; for those that open, the driver, card and pixel formats
//! (V4L2's QUERYCAP and ENUM_FMT ioctls) against the formats Tern reads.
//! Built in every configuration, so that a binary without the `camera`
//! feature still explains the machine's cameras.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Pixel formats Tern converts (fourcc, name).
pub const READABLE_FORMATS: &[(&str, &str)] =
    &[("MJPG", "MJPEG"), ("JPEG", "JPEG"), ("YUYV", "YUYV"), ("RGB3", "RGB"), ("GREY", "gray")];

/// One `/dev/video*` node and what was learnt about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// The device node.
    pub path: PathBuf,
    /// Owner group of the node, by name where `/etc/group` names it.
    pub group: String,
    /// Permission bits of the node, e.g. `660`.
    pub mode: String,
    /// Kernel driver (`uvcvideo`), when the node could be queried.
    pub driver: Option<String>,
    /// Card name (`HD Pro Webcam C920`), when the node could be queried.
    pub card: Option<String>,
    /// Pixel formats the node offers for capture, as fourcc codes.
    pub formats: Vec<String>,
    /// `ready`, or what stops Tern from reading it.
    pub status: Status,
}

/// Whether a node can be read, and if not why and the fix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Status {
    /// Opens, captures, offers a format Tern reads.
    Ready,
    /// Cannot be used.
    Problem {
        /// What is wrong.
        reason: String,
        /// What to do about it.
        fix: String,
    },
}

/// What stops a node from being used, from the facts gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `open` failed with this errno.
    Open(i32),
    /// The busy check (a buffer request) failed with this errno.
    Busy(i32),
    /// QUERYCAP failed: not a V4L2 device (errno).
    NotV4l2(i32),
    /// The node has no video-capture capability.
    NotCapture,
    /// The node captures, but in no format Tern reads.
    NoReadableFormat,
}

/// The reason and the fix for `fault` on `node` (group, mode and formats
/// filled in), for a user who is or is not in the node's group.
pub fn advise(fault: Fault, node: &Node, user_in_group: bool) -> Status {
    let path = node.path.display();
    let group = &node.group;
    let (reason, fix) = match fault {
        Fault::Open(e) if e == libc::EACCES || e == libc::EPERM => {
            let reason = if user_in_group {
                format!("permission denied: {path} is mode {} for group {group}", node.mode)
            } else {
                format!(
                    "permission denied: {path} belongs to group {group} (mode {}) and this user is not in it",
                    node.mode
                )
            };
            let fix = if user_in_group {
                format!(
                    "the group may have been added in this session: log out and in again (check with `id`); \
                     else ask for read-write access to {path}"
                )
            } else {
                format!("sudo usermod -aG {group} $USER, then log out and in again (check with `id`)")
            };
            (reason, fix)
        }
        Fault::Open(e) | Fault::Busy(e) if e == libc::EBUSY => (
            "busy: another program is using it".to_owned(),
            format!("find it with `fuser -v {path}` (or `lsof {path}`) and stop it; only one program can capture"),
        ),
        Fault::Open(e) if e == libc::ENOENT || e == libc::ENODEV || e == libc::ENXIO => (
            format!("the device is gone ({})", errno_text(e)),
            "reconnect the camera and look at `dmesg | tail`".to_owned(),
        ),
        Fault::Open(e) | Fault::Busy(e) => (
            format!("cannot open: {}", errno_text(e)),
            "look at `dmesg | tail` for the driver's messages".to_owned(),
        ),
        Fault::NotV4l2(e) => (
            format!("not a V4L2 device (QUERYCAP: {})", errno_text(e)),
            "pass the camera's own /dev/videoN node".to_owned(),
        ),
        Fault::NotCapture => (
            "not a capture device (many USB cameras add a second, metadata-only node)".to_owned(),
            "use the camera's other /dev/videoN node: the one listed as ready".to_owned(),
        ),
        Fault::NoReadableFormat => {
            let reads: Vec<&str> = READABLE_FORMATS.iter().map(|(f, _)| *f).collect();
            (
                format!(
                    "unsupported formats: it offers {}; Tern reads {}",
                    if node.formats.is_empty() { "none".to_owned() } else { node.formats.join(", ") },
                    reads.join(", ")
                ),
                "use a camera (or a mode of it) that gives MJPEG or YUYV, or serve it over the network \
                 as MJPEG (e.g. with mjpg-streamer or go2rtc) and pass --url"
                    .to_owned(),
            )
        }
    };
    Status::Problem { reason, fix }
}

fn errno_text(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// The `video*` nodes in `dev` (normally `/dev`), in number order, each
/// examined. No node is an empty list.
pub fn scan(dev: &Path) -> std::io::Result<Vec<Node>> {
    let mut paths: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dev)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("video").and_then(|n| n.parse::<u64>().ok()) {
            paths.push((n, e.path()));
        }
    }
    paths.sort();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Ok(paths.into_iter().map(|(_, p)| examine(&p, &groups)).collect())
}

/// The name of group `gid` in the text of `/etc/group`, else the number.
fn group_name(groups: &str, gid: u32) -> String {
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == gid).then(|| name.to_owned())
        })
        .unwrap_or_else(|| gid.to_string())
}

/// Whether this process has `gid` among its groups.
fn in_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut list = vec![0 as libc::gid_t; 256];
    // SAFETY: `list` has room for `list.len()` gids, the count passed.
    let n = unsafe { libc::getgroups(list.len() as libc::c_int, list.as_mut_ptr()) };
    n > 0 && list[..n as usize].contains(&gid)
}

fn examine(path: &Path, groups: &str) -> Node {
    let (gid, mode) = std::fs::metadata(path).map(|m| (m.gid(), m.mode() & 0o777)).unwrap_or((u32::MAX, 0));
    let mut node = Node {
        path: path.to_owned(),
        group: group_name(groups, gid),
        mode: format!("{mode:o}"),
        driver: None,
        card: None,
        formats: Vec::new(),
        status: Status::Ready,
    };
    let fault = query(&mut node).err();
    if let Some(f) = fault {
        node.status = advise(f, &node, in_group(gid));
    }
    node
}

/// `struct v4l2_capability` (linux/videodev2.h).
#[repr(C)]
struct Capability {
    driver: [u8; 16],
    card: [u8; 32],
    bus_info: [u8; 32],
    version: u32,
    capabilities: u32,
    device_caps: u32,
    reserved: [u32; 3],
}

/// `struct v4l2_fmtdesc`.
#[repr(C)]
struct FmtDesc {
    index: u32,
    kind: u32,
    flags: u32,
    description: [u8; 32],
    pixelformat: u32,
    mbus_code: u32,
    reserved: [u32; 3],
}

/// `struct v4l2_requestbuffers`.
#[repr(C)]
struct RequestBuffers {
    count: u32,
    kind: u32,
    memory: u32,
    capabilities: u32,
    flags: u8,
    reserved: [u8; 3],
}

/// `_IOC(dir, 'V', nr, size)` of the generic Linux ioctl encoding (x86,
/// ARM, RISC-V; not MIPS, PowerPC, SPARC).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'V' as u64) << 8) | nr
}
const READ: u64 = 2;
const READ_WRITE: u64 = 3;
const VIDIOC_QUERYCAP: u64 = ioc(READ, 0, std::mem::size_of::<Capability>());
const VIDIOC_ENUM_FMT: u64 = ioc(READ_WRITE, 2, std::mem::size_of::<FmtDesc>());
const VIDIOC_REQBUFS: u64 = ioc(READ_WRITE, 8, std::mem::size_of::<RequestBuffers>());
const CAP_VIDEO_CAPTURE: u32 = 0x1;
const CAP_DEVICE_CAPS: u32 = 0x8000_0000;
const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
const MEMORY_MMAP: u32 = 1;

fn ioctl<T>(fd: i32, request: u64, arg: &mut T) -> Result<(), i32> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct of exactly the size encoded in
    // `request` (see `ioc`), so the kernel reads and writes only within it.
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_owned()
}

fn fourcc(v: u32) -> String {
    v.to_le_bytes().iter().map(|&b| if b.is_ascii_graphic() { char::from(b) } else { '?' }).collect::<String>()
}

/// Opens the node and fills in driver, card and formats; the first fault
/// found otherwise.
fn query(node: &mut Node) -> Result<(), Fault> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&node.path)
        .map_err(|e| Fault::Open(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let fd = file.as_raw_fd();
    // SAFETY: a plain-old-data struct of integers and byte arrays: all zeros is valid.
    let mut cap: Capability = unsafe { std::mem::zeroed() };
    ioctl(fd, VIDIOC_QUERYCAP, &mut cap).map_err(Fault::NotV4l2)?;
    node.driver = Some(c_string(&cap.driver));
    node.card = Some(c_string(&cap.card));
    let caps = if cap.capabilities & CAP_DEVICE_CAPS != 0 { cap.device_caps } else { cap.capabilities };
    if caps & CAP_VIDEO_CAPTURE == 0 {
        return Err(Fault::NotCapture);
    }
    for index in 0..64 {
        // SAFETY: as above, all zeros is a valid `FmtDesc`.
        let mut desc: FmtDesc = unsafe { std::mem::zeroed() };
        desc.index = index;
        desc.kind = BUF_TYPE_VIDEO_CAPTURE;
        if ioctl(fd, VIDIOC_ENUM_FMT, &mut desc).is_err() {
            break;
        }
        node.formats.push(fourcc(desc.pixelformat));
    }
    if !node.formats.iter().any(|f| READABLE_FORMATS.iter().any(|(r, _)| r == f)) {
        return Err(Fault::NoReadableFormat);
    }
    // Asking for zero buffers frees ours and fails with EBUSY when another
    // open file (another program) owns the capture queue.
    let mut req =
        RequestBuffers { count: 0, kind: BUF_TYPE_VIDEO_CAPTURE, memory: MEMORY_MMAP, capabilities: 0, flags: 0, reserved: [0; 3] };
    match ioctl(fd, VIDIOC_REQBUFS, &mut req) {
        Err(e) if e == libc::EBUSY => Err(Fault::Busy(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(formats: &[&str]) -> Node {
        Node {
            path: PathBuf::from("/dev/video2"),
            group: "video".into(),
            mode: "660".into(),
            driver: None,
            card: None,
            formats: formats.iter().map(|f| f.to_string()).collect(),
            status: Status::Ready,
        }
    }

    fn text(s: Status) -> (String, String) {
        match s {
            Status::Problem { reason, fix } => (reason, fix),
            Status::Ready => panic!("expected a problem"),
        }
    }

    #[test]
    fn each_fault_gets_its_reason_and_fix() {
        let n = node(&[]);
        let (reason, fix) = text(advise(Fault::Open(libc::EACCES), &n, false));
        assert!(reason.contains("permission denied") && reason.contains("group video"), "{reason}");
        assert!(fix.contains("sudo usermod -aG video $USER") && fix.contains("log out and in"), "{fix}");
        let (_, fix) = text(advise(Fault::Open(libc::EACCES), &n, true));
        assert!(fix.contains("log out and in") && !fix.contains("usermod"), "{fix}");
        for f in [Fault::Open(libc::EBUSY), Fault::Busy(libc::EBUSY)] {
            let (reason, fix) = text(advise(f, &n, true));
            assert!(reason.contains("busy") && fix.contains("fuser -v /dev/video2"), "{reason} / {fix}");
        }
        let (reason, _) = text(advise(Fault::Open(libc::ENODEV), &n, true));
        assert!(reason.contains("gone"), "{reason}");
        let (reason, fix) = text(advise(Fault::NotCapture, &n, true));
        assert!(reason.contains("not a capture device") && fix.contains("other"), "{reason} / {fix}");
        let (reason, fix) = text(advise(Fault::NoReadableFormat, &node(&["H264", "NV12"]), true));
        assert!(reason.contains("offers H264, NV12") && reason.contains("MJPG, JPEG, YUYV"), "{reason}");
        assert!(fix.contains("--url"), "{fix}");
        let (reason, _) = text(advise(Fault::NotV4l2(libc::ENOTTY), &n, true));
        assert!(reason.contains("not a V4L2 device"), "{reason}");
    }

    #[test]
    fn ioctl_numbers_match_videodev2() {
        assert_eq!(VIDIOC_QUERYCAP, 0x8068_5600);
        assert_eq!(VIDIOC_ENUM_FMT, 0xC040_5602);
        assert_eq!(VIDIOC_REQBUFS, 0xC014_5608);
        assert_eq!(fourcc(u32::from_le_bytes(*b"MJPG")), "MJPG");
    }

    #[test]
    fn nodes_are_found_in_number_order_and_a_non_v4l2_file_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["video10", "video2", "videox", "vbi0"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let nodes = scan(dir.path()).unwrap();
        let names: Vec<_> = nodes.iter().map(|n| n.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["video2", "video10"]);
        for n in &nodes {
            let (reason, _) = text(n.status.clone());
            assert!(reason.contains("not a V4L2 device"), "{reason}");
        }
        assert_eq!(group_name("root:x:0:\nvideo:x:44:pi\n", 44), "video");
        assert_eq!(group_name("root:x:0:\n", 44), "44");
        assert!(scan(&dir.path().join("missing")).is_err());
    }
}

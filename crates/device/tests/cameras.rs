//! `tern-device cameras` on this machine and on device-node folders made
//! here: no node at all said plainly, a file that is no V4L2 device
//! explained, and — run as an unprivileged user through `setpriv` when the
//! tests run as root — a node this user may not open, with the `usermod`
//! fix. The advice for each fault (busy, not a capture node, unsupported
//! formats) is unit-tested in `camera/nodes.rs`.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn cameras(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-device")).arg("cameras").args(args).output().expect("run tern-device")
}

fn has_video_nodes() -> bool {
    std::fs::read_dir("/dev")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("video")))
        .unwrap_or(false)
}

#[test]
fn this_machine_without_cameras_says_so() {
    if has_video_nodes() {
        eprintln!("skipped: this machine has /dev/video* nodes");
        return;
    }
    let out = cameras(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no cameras: no video* device nodes in /dev"), "{stdout}");
    assert_eq!(stdout.contains("without camera support"), !cfg!(feature = "camera"), "{stdout}");
    let out = cameras(&["--json"]);
    assert!(out.status.success() && out.stdout.is_empty());
}

#[test]
fn a_node_that_is_no_v4l2_device_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("video0"), b"").unwrap();
    let out = cameras(&["--dev-dir", dir.path().to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let node: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(node["status"]["state"], "problem");
    assert!(node["status"]["reason"].as_str().unwrap().contains("not a V4L2 device"), "{node}");
}

#[test]
fn a_node_this_user_may_not_open_says_why_and_the_fix() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !root || !setpriv.exists() {
        assert!(std::env::var_os("CI").is_none() || !root, "CI runs as root and needs setpriv (util-linux)");
        eprintln!("skipped: needs root and setpriv to act as an unprivileged user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = dir.path().join("video3");
    std::fs::write(&node, b"").unwrap();
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o660)).unwrap();
    // A copy of the binary that the unprivileged user can reach (the build
    // tree may be under a private home).
    let bin = dir.path().join("tern-device");
    std::fs::copy(env!("CARGO_BIN_EXE_tern-device"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // nobody:nogroup, without supplementary groups.
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["cameras", "--dev-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("video3: permission denied"), "{stdout}");
    assert!(stdout.contains("this user is not in it"), "{stdout}");
    assert!(stdout.contains("fix: sudo usermod -aG root $USER, then log out and in again"), "{stdout}");
}

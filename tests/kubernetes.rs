//! The Kubernetes example (examples/kubernetes/) against the real things it
//! names: every manifest passes `kubernetes-validate --strict` (the API's
//! own OpenAPI schemas, unknown fields rejected) for the oldest Kubernetes it
//! needs and for the newest the validator knows; the Deployment's container
//! command line is one that procman accepts; the ports and paths its probes
//! ask for are the ones that command line serves, answered by a real procman
//! run with it; and its grace period covers preStop plus procman's drain.
//!
//! scripts/test installs the validator (PyPI `kubernetes-validate`, whose
//! PyYAML these tests also use to read the manifests) into
//! target/kubernetes-validate/venv. A missing validator fails with a
//! how-to: it never lets these tests pass without having run.

mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

/// Where scripts/test installs kubernetes-validate.
const VALIDATOR_VENV: &str = "target/kubernetes-validate/venv";

/// The Kubernetes versions the manifests must be valid for: 1.30, the first
/// whose kubelet has the `sleep` preStop action on by default, and the
/// newest release the pinned validator has schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// How long a worker may take to import the FastAPI app on a loaded machine.
const BOOT: Duration = Duration::from_secs(60);

fn validator_bin(name: &str) -> PathBuf {
    let p = repo().join(VALIDATOR_VENV).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it installs kubernetes-validate from PyPI into {VALIDATOR_VENV})",
        p.display()
    );
    p
}

/// Every manifest of the example, in a stable order.
fn manifests() -> Vec<PathBuf> {
    let dir = repo().join("examples/kubernetes");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    found.sort();
    found
}

/// The example's documents as JSON, read by PyYAML (a YAML 1.1 reader, as
/// kubectl's is for these plain manifests).
fn documents() -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
                  print(json.dumps(docs))\n";
    let out = Command::new(validator_bin("python"))
        .arg("-c")
        .arg(script)
        .args(manifests())
        .output()
        .expect("run the validator's python");
    assert!(
        out.status.success(),
        "reading the manifests failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("JSON from PyYAML") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    let [one] = &found[..] else {
        panic!(
            "expected one {kind} in examples/kubernetes, found {}",
            found.len()
        );
    };
    one
}

/// The Deployment's one container.
fn container(docs: &[Value]) -> &Value {
    let containers = kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let [c] = &containers[..] else {
        panic!("expected one container, found {}", containers.len());
    };
    c
}

/// The container's command line after `procman`.
fn procman_args(c: &Value) -> Vec<String> {
    assert_eq!(
        c["command"],
        serde_json::json!(["procman"]),
        "the container's entrypoint must be procman itself (PID 1)"
    );
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

/// The value of `--name=V` or `--name V` in `args`.
fn option(args: &[String], name: &str) -> Option<String> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v.to_string())
        } else if a == name {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

/// The containerPort a probe's `port` (a name or a number) designates.
fn probe_port(c: &Value, probe: &str) -> u64 {
    let port = &c[probe]["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port
        .as_str()
        .unwrap_or_else(|| panic!("{probe}: no httpGet port"));
    c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{probe}: no container port named {name}"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

#[test]
fn every_manifest_passes_kubernetes_validate_strictly() {
    let files = manifests();
    for want in ["deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"] {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "examples/kubernetes/{want} is missing: {files:?}"
        );
    }
    let documents = documents().len();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(validator_bin("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict for {version} rejected the manifests:\n{text}"
        );
        // One "passed" line per document: a file it skipped (an unknown
        // kind or version) must not count as valid.
        assert_eq!(
            text.matches(" passed for resource ").count(),
            documents,
            "not every document was validated for {version}:\n{text}"
        );
    }
}

#[test]
fn the_deployments_command_line_is_one_procman_accepts() {
    let docs = documents();
    let c = container(&docs);
    let args = procman_args(c);
    // --check-config parses every option and imports the app once, as the
    // image would (there procman finds the virtualenv's python beside it).
    let out = Command::new(PROCMAN)
        .args(&args)
        .arg("--check-config")
        .arg("--python")
        .arg(venv_python())
        .arg("--chdir")
        .arg(repo().join("examples/fastapi"))
        .env_remove("WEB_CONCURRENCY")
        .env_remove("PORT")
        .output()
        .expect("run procman --check-config");
    assert!(
        out.status.success(),
        "procman rejected the Deployment's command line {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(option(&args, "--workers").as_deref(), Some("auto"));
    assert!(
        c["resources"]["limits"]["cpu"].is_string(),
        "--workers auto follows the CPU limit: set resources.limits.cpu"
    );

    // The ports the probes and the Service use are the ones procman serves.
    let metrics = option(&args, "--metrics").expect("--metrics in the args");
    assert_eq!(probe_port(c, "readinessProbe"), port_of(&metrics));
    assert_eq!(probe_port(c, "livenessProbe"), port_of(&metrics));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let bind = option(&args, "--bind").expect("--bind in the args");
    let http = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "http")
        .and_then(|p| p["containerPort"].as_u64());
    assert_eq!(http, Some(port_of(&bind)), "the http port is --bind's");
    let service = kind(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        service["spec"]["selector"],
        kind(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    );

    // The kubelet's SIGKILL comes terminationGracePeriodSeconds after the
    // stop began, preStop included: it must leave procman its whole drain.
    let graceful: u64 = option(&args, "--graceful-timeout")
        .expect("--graceful-timeout in the args")
        .parse()
        .expect("--graceful-timeout in seconds");
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    let grace = kind(&docs, "Deployment")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > pre_stop + graceful,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + --graceful-timeout {graceful} s"
    );
}

/// The address procman logged for `what` ("Listening at" or "Serving
/// metrics at").
fn logged_addr(h: &Harness, what: &str) -> SocketAddr {
    let needle = format!("{what}: http://");
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split(&needle).nth(1)?;
            let end = rest
                .find(|ch: char| !(ch.is_ascii_digit() || ch == '.' || ch == ':'))
                .unwrap_or(rest.len());
            rest[..end].parse::<SocketAddr>().ok()
        })
    });
    match found {
        Some(a) => a,
        None => panic!("no {what:?} address in the log\n{}", h.log_text()),
    }
}

#[test]
fn the_deployments_probes_are_answered_by_procman_run_with_its_command_line() {
    let docs = documents();
    let c = container(&docs);
    // The manifest's command line, with its 0.0.0.0 ports moved to free
    // loopback ones (this test's own).
    let args: Vec<String> = procman_args(c)
        .into_iter()
        .map(|a| match a.split_once("0.0.0.0:") {
            Some((head, _)) => format!("{head}127.0.0.1:0"),
            None => a,
        })
        .collect();
    let python = venv_python().display().to_string();
    let chdir = repo().join("examples/fastapi").display().to_string();
    let mut h = Start::new("k8s-probes", &[])
        .no_default_bind()
        .args(&args)
        .args(["--python", &python, "--chdir", &chdir])
        .spawn();
    let metrics = logged_addr(&h, "Serving metrics at");
    let ready = c["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("path");
    let live = c["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("path");
    // 503 (no worker ready yet) is what a booting pod answers; anything
    // else but 200 is final.
    let status = wait_for(BOOT, || match http_get(metrics, ready) {
        Ok((503, _)) | Err(_) => None,
        Ok((code, _)) => Some(code),
    });
    h.check(
        status == Some(200),
        &format!("{ready} answered 200, got {status:?}"),
    );
    h.check(
        matches!(http_get(metrics, live), Ok((200, _))),
        &format!("{live} answered 200"),
    );
    let app = logged_addr(&h, "Listening at");
    h.check(
        matches!(http_get(app, "/"), Ok((200, _))),
        "the app answered on --bind",
    );
    // What the kubelet sends after preStop: procman drains and exits 0.
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    h.check(code == 0, &format!("procman exited 0 on TERM, got {code}"));
}

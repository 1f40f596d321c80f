//! Offline validation of `deploy/` as part of the test suite: runs
//! `scripts/validate_deploy.py`, which renders every kustomize overlay (and
//! combinations with the components) with `kubectl kustomize`, validates the
//! objects against the Kubernetes, KEDA and NVIDIA device plugin schemas,
//! lints the Dockerfile, and requires deliberately broken copies to fail.
//! Needs kubectl on PATH and the venv of `scripts/env.sh`; the script names
//! whatever is missing. A second test starts the real server and scaler the
//! way the `cpu` overlay configures them.

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;
use torchwire_integration_tests::{bundled_model, repo_root, ChildProcess, NatsServer};
use torchwire_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use torchwire_proto::externalscaler::ScaledObjectRef;
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::ListModelsRequest;

/// The venv's Python when `scripts/env.sh` was sourced, else `python3`.
fn python() -> String {
    match std::env::var("TORCHWIRE_VENV") {
        Ok(venv) if !venv.is_empty() => format!("{venv}/bin/python"),
        _ => "python3".into(),
    }
}

/// Reads `<n> <what>` from the validator's summary line.
fn count(summary: &str, what: &str) -> usize {
    let words: Vec<&str> = summary.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.trim_end_matches(',') == what)
        .unwrap_or_else(|| panic!("no {what:?} in {summary:?}"));
    words[at - 1]
        .parse()
        .unwrap_or_else(|_| panic!("no count before {what:?} in {summary:?}"))
}

#[test]
fn every_overlay_validates_and_every_broken_copy_is_rejected() {
    let root = repo_root();
    let out = Command::new(python())
        .arg(root.join("scripts/validate_deploy.py"))
        .current_dir(&root)
        .output()
        .expect("run scripts/validate_deploy.py (is Python 3 installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/validate_deploy.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("validate_deploy:"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    // Not vacuous: the overlays were rendered and their objects checked, and
    // every broken copy failed (`<n> of <m> broken copies rejected`).
    assert!(count(summary, "renderings") >= 5, "{summary}");
    assert!(count(summary, "objects") >= 50, "{summary}");
    let rejected = count(summary, "of");
    let broken = count(summary, "broken");
    assert!(
        broken >= 10 && rejected == broken,
        "not every broken copy was rejected: {summary}"
    );
    assert_eq!(count(summary, "failures"), 0, "{summary}");
    for overlay in ["cpu", "gpu", "mig", "time-slicing"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok   {overlay}:"))),
            "overlay {overlay} not validated:\n{stdout}"
        );
    }
}

/// How the rendering `name` starts the server and the scaler
/// (`validate_deploy.py --launch`).
fn launch(name: &str) -> Value {
    let root = repo_root();
    let out = Command::new(python())
        .arg(root.join("scripts/validate_deploy.py"))
        .args(["--launch", name])
        .current_dir(&root)
        .output()
        .expect("run scripts/validate_deploy.py --launch");
    assert!(
        out.status.success(),
        "validate_deploy.py --launch {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from --launch")
}

/// One Deployment's container as the test runs it here: its ConfigMap files
/// written to `dir` (the `--config=` path rewritten to match), its
/// environment with only what cannot work outside the cluster changed (the
/// NATS URL, the admin port bound to 127.0.0.1:0, one torch thread).
fn local_process(
    spec: &Value,
    dir: &std::path::Path,
    nats_url: &str,
) -> (Vec<String>, Vec<(String, String)>) {
    let mut files = HashMap::new();
    for (pod_path, text) in spec["files"].as_object().expect("files") {
        let mut text = text.as_str().expect("file text").to_string();
        // The image's model path, here the repository's copy.
        text = text.replace(
            "\"/models/torchwire-tiny\"",
            &format!("{:?}", bundled_model().display().to_string()),
        );
        let local = dir.join(pod_path.trim_start_matches('/').replace('/', "_"));
        std::fs::write(&local, text).unwrap();
        files.insert(pod_path.clone(), local.display().to_string());
    }
    let mut args = Vec::new();
    for arg in spec["args"].as_array().expect("args") {
        let arg = arg.as_str().expect("string arg");
        if arg.starts_with("--listen") {
            continue;
        }
        let mut arg = arg.to_string();
        for (pod_path, local) in &files {
            arg = arg.replace(pod_path.as_str(), local);
        }
        args.push(arg);
    }
    args.push("--listen=127.0.0.1:0".into());
    let env = spec["env"]
        .as_object()
        .expect("env")
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().expect("string env value");
            let v = if k.ends_with("NATS_URL") {
                nats_url
            } else if k.ends_with("ADMIN_LISTEN") {
                "127.0.0.1:0"
            } else if k == "TORCHWIRE_THREADS" {
                "1"
            } else {
                v
            };
            (k.clone(), v.to_string())
        })
        .collect();
    (args, env)
}

#[tokio::test]
async fn the_cpu_overlay_starts_a_server_whose_batch_size_is_the_scalers_target() {
    let launch = launch("cpu");
    let (server, scaler, trigger) = (
        &launch["torchwire-server"],
        &launch["torchwire-scaler"],
        &launch["trigger"],
    );
    let dir = tempfile::tempdir().unwrap();
    // NATS with the two users of the example Secrets.
    let user = |spec: &Value, prefix: &str| {
        (
            spec["env"][format!("{prefix}NATS_USER")]
                .as_str()
                .unwrap()
                .to_string(),
            spec["env"][format!("{prefix}NATS_PASSWORD")]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let users = [
        user(server, "TORCHWIRE_"),
        user(scaler, "TORCHWIRE_SCALER_"),
    ];
    let conf = dir.path().join("nats.conf");
    let entries: Vec<String> = users
        .iter()
        .map(|(u, p)| {
            format!(
                "{{user: {}, password: {}}}",
                Value::from(u.as_str()),
                Value::from(p.as_str())
            )
        })
        .collect();
    std::fs::write(
        &conf,
        format!("authorization {{ users = [ {} ] }}\n", entries.join(", ")),
    )
    .unwrap();
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]).unwrap();

    let (args, env) = local_process(server, dir.path(), &nats.url());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = ChildProcess::spawn("torchwire-server", &args, &env)
        .unwrap_or_else(|e| panic!("torchwire-server {args:?} with {env:?}: {e}"));
    server.wait_serving("").await.unwrap();
    let models = InferenceClient::new(server.channel().await.unwrap())
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let served = models
        .iter()
        .find(|m| m.is_default)
        .expect("a default model");

    let target: u32 = trigger["metadata"]["targetPerReplica"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("targetPerReplica");
    assert_eq!(
        served.max_batch_size, target,
        "the server runs batches of {}, the ScaledObject divides by {target}",
        served.max_batch_size
    );

    // The scaler, as the overlay starts it, accepts the rendered trigger's
    // metadata (it rejects unknown keys) and reports the same target to KEDA.
    let (args, env) = local_process(scaler, dir.path(), &nats.url());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let scaler = ChildProcess::spawn("torchwire-scaler", &args, &env)
        .unwrap_or_else(|e| panic!("torchwire-scaler {args:?} with {env:?}: {e}"));
    scaler.wait_serving("").await.unwrap();
    let metadata: HashMap<String, String> = trigger["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let spec = ExternalScalerClient::new(scaler.channel().await.unwrap())
        .get_metric_spec(ScaledObjectRef {
            name: "torchwire-server".into(),
            namespace: "torchwire".into(),
            scaler_metadata: metadata,
        })
        .await
        .unwrap_or_else(|e| panic!("GetMetricSpec with the rendered trigger: {e}"))
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1, "{spec:?}");
    assert_eq!(spec.metric_specs[0].target_size_float, f64::from(target));
}

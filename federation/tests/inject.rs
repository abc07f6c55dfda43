//! The sidecar-injection webhook, as the Kubernetes API server uses it: the
//! `fedmesh-federation` binary serving `--inject-listen` with the chart's
//! rendered template, called over HTTPS (curl, HTTP/2 and HTTP/1.1,
//! checking the certificate against the mesh root under the Service's DNS
//! name, as the webhook configuration's caBundle makes the API server do)
//! with AdmissionReview v1 requests (tests/fixtures/admission); the patched
//! Pod applied with a JSON Patch implementation and validated with
//! kubernetes-validate. And the chart's MutatingWebhookConfiguration,
//! evaluated as the API server evaluates its selectors.
//!
//! The rendered chart comes from scripts/validate-deploy.sh (which the test
//! suite runs first; run here if its output is missing).

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use mesh_test::process::Proc;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");
const SVC: &str = "fedmesh-federation.fedmesh-system.svc";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart and kustomize output of scripts/validate-deploy.sh.
fn rendered(file: &str) -> Vec<Value> {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = root().join("target/deploy-validate/rendered");
    {
        let _g = ONCE.lock().unwrap_or_else(|p| p.into_inner());
        if !dir.join(file).exists() {
            let st = Command::new("bash")
                .arg(root().join("scripts/validate-deploy.sh"))
                .status()
                .unwrap();
            assert!(st.success(), "scripts/validate-deploy.sh failed");
        }
    }
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

/// The federation binary with the webhook on, serving `template`; returns
/// the process, the webhook's port and the mesh root (PEM file).
fn federation(dir: &Path, template: &str, extra: &[&str]) -> (Proc, u16, PathBuf) {
    let tpl = dir.join("sidecar.yaml");
    std::fs::write(&tpl, template).unwrap();
    let admin = dir.join("admin.yaml");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--registry",
        "memory",
        "--bootstrap-admin",
        admin.to_str().unwrap(),
        "--tls-san",
        SVC,
        "--inject-listen",
        "127.0.0.1:0",
        "--inject-template",
        tpl.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(BIN, &args);
    let line = p.wait_for_line("webhook listening on", Duration::from_secs(20));
    let port = line
        .rsplit("listening on ")
        .next()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .port();
    common::listening_addr(&mut p);
    let ca = dir.join("root.pem");
    std::fs::write(&ca, common::context_at(&admin).certificate_authority_data).unwrap();
    (p, port, ca)
}

/// What curl got: status, HTTP version, body.
struct Answer {
    status: u16,
    version: String,
    body: String,
}

/// POSTs `body` to the webhook as the API server would dial it: by the
/// Service's DNS name, the certificate checked against the mesh root.
fn call(port: u16, ca: &Path, method: &str, path: &str, body: &[u8], http: &str) -> Answer {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            http,
            "--max-time",
            "20",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("{SVC}:{port}:127.0.0.1"),
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", file.path().display()),
            "-w",
            "\n%{http_code} %{http_version}",
            &format!("https://{SVC}:{port}{path}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (status, version) = tail.split_once(' ').unwrap();
    Answer {
        status: status.parse().unwrap(),
        version: version.to_string(),
        body: body.to_string(),
    }
}

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The `patch.yaml` of the rendered chart's fedmesh-sidecar-injector.
fn chart_template(file: &str) -> String {
    let docs = rendered(file);
    object(&docs, "ConfigMap", "fedmesh-sidecar-injector")["data"]["patch.yaml"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Reviews `review` and returns the response, and the patched object when
/// there is a patch.
fn reviewed(port: u16, ca: &Path, review: &Value, http: &str) -> (Value, Option<Value>) {
    let a = call(
        port,
        ca,
        "POST",
        "/inject",
        review.to_string().as_bytes(),
        http,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let want = if http == "--http2" { "2" } else { "1.1" };
    assert_eq!(a.version, want, "the protocol curl asked for");
    let answer: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let resp = answer["response"].clone();
    assert_eq!(resp["uid"], review["request"]["uid"], "the uid is echoed");
    assert_eq!(resp["allowed"], true);
    let patched = resp.get("patch").map(|p| {
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        pod
    });
    (resp, patched)
}

/// kubernetes-validate (strict, the Kubernetes versions the chart is
/// checked against) on one object.
fn validate(dir: &Path, obj: &Value) {
    let f = dir.join("patched.json");
    std::fs::write(&f, serde_json::to_string_pretty(obj).unwrap()).unwrap();
    let out = Command::new("python3")
        .env("PYTHONPATH", root().join("target/deploy-validate/python"))
        .arg(root().join("scripts/deploy_render.py"))
        .args(["validate", "1.25,1.32,1.37", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate refused the patched Pod:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(obj).unwrap()
    );
}

fn names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_webhook_adds_the_charts_sidecar_over_https_once_and_only_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (_fed, port, ca) = federation(dir.path(), &chart_template("helm-example.yaml"), &[]);

    // A Deployment's Pod, as the ReplicaSet controller creates it, over
    // HTTP/2 (what the API server speaks to webhooks).
    let review = fixture("replicaset-pod.json");
    let (resp, patched) = reviewed(port, &ca, &review, "--http2");
    assert!(resp.get("warnings").is_none(), "{resp}");
    let pod = patched.expect("the Pod was patched");
    assert_eq!(names(&pod, "containers"), ["reviews", "fedmesh-agent"]);
    assert_eq!(names(&pod, "initContainers"), ["fedmesh-init"]);
    assert_eq!(
        names(&pod, "volumes"),
        ["kube-api-access-x7k2q", "fedmesh-federation-access"]
    );
    let notes = &pod["metadata"]["annotations"];
    assert_eq!(notes["fedmesh.io/status"], "injected");
    assert_eq!(
        notes["fedmesh.io/app-port"], "9080",
        "from the containerPort"
    );
    let agent = &pod["spec"]["containers"][1];
    assert!(
        agent["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "FEDMESH_SERVICE", "value": "reviews"})),
        "{agent}"
    );
    assert_eq!(agent["securityContext"]["runAsUser"], 1337);
    assert!(agent["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--kube-token-file=/var/run/secrets/fedmesh/token")));
    // The capture: outbound to 15001 except the agent's own uid, inbound
    // on the application's port to 15006.
    let init = pod["spec"]["initContainers"][0]["command"].to_string();
    for rule in [
        "--uid-owner 1337 -j RETURN",
        "-j REDIRECT --to-ports 15001",
        "--dport \\\"$APP_PORT\\\" -j REDIRECT --to-ports 15006",
    ] {
        assert!(init.contains(rule), "{rule} not in {init}");
    }
    assert_eq!(
        pod["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    // The projected ServiceAccount token for enrollment, for the
    // federation's audience.
    let access = &pod["spec"]["volumes"][1]["projected"]["sources"];
    assert!(
        access
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["serviceAccountToken"]["audience"] == "fedmesh"),
        "{access}"
    );
    validate(dir.path(), &pod);

    // Never twice: the patched Pod sent again (a reinvocation, or a Pod
    // template injected by hand) is left as it is. Over HTTP/1.1 too.
    let mut again = review.clone();
    again["request"]["uid"] = json!("b3a1c2d4-0000-4000-8000-000000000001");
    again["request"]["object"] = pod;
    let (resp, patched) = reviewed(port, &ca, &again, "--http1.1");
    assert!(
        patched.is_none() && resp.get("warnings").is_none(),
        "{resp}"
    );

    // Opting out by annotation: no patch, no warning.
    let mut out = review.clone();
    out["request"]["object"]["metadata"]["annotations"] = json!({"fedmesh.io/inject": "false"});
    let (resp, patched) = reviewed(port, &ca, &out, "--http2");
    assert!(
        patched.is_none() && resp.get("warnings").is_none(),
        "{resp}"
    );

    // A Pod that cannot be meshed is let through unmeshed, with a warning
    // naming why (kubectl prints it to whoever created the Pod).
    let (resp, patched) = reviewed(port, &ca, &fixture("kubectl-run-pod.json"), "--http2");
    assert!(patched.is_none());
    let w = resp["warnings"][0].as_str().unwrap();
    assert!(
        w.contains("no service name") && w.contains("app.kubernetes.io/name"),
        "{w}"
    );
}

#[test]
fn the_webhook_refuses_what_is_not_a_review_by_name_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", mesh_test::free_port());
    let (_fed, port, ca) = federation(
        dir.path(),
        &chart_template("helm-options.yaml"),
        &["--admin", &metrics],
    );
    let a = call(port, &ca, "GET", "/inject", b"", "--http2");
    assert_eq!(a.status, 405, "{}", a.body);
    let a = call(port, &ca, "POST", "/mutate", b"{}", "--http2");
    assert_eq!(a.status, 404, "{}", a.body);
    let a = call(port, &ca, "POST", "/inject", b"{\"kind\":", "--http2");
    assert_eq!(
        (a.status, a.body.contains("not JSON")),
        (400, true),
        "{}",
        a.body
    );
    let mut old = fixture("replicaset-pod.json");
    old["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let a = call(
        port,
        &ca,
        "POST",
        "/inject",
        old.to_string().as_bytes(),
        "--http1.1",
    );
    assert_eq!(a.status, 400);
    assert!(a.body.contains("admission.k8s.io/v1"), "{}", a.body);
    // Larger than the API server ever sends (3 MiB): refused without
    // reading on (HTTP/1.1: over HTTP/2 the early answer resets the
    // stream, which curl reports as an error instead of the status).
    let big = vec![b' '; federation::inject::MAX_BODY + 1];
    let a = call(port, &ca, "POST", "/inject", &big, "--http1.1");
    assert_eq!(a.status, 413, "{}", a.body);
    // The webhook still answers afterwards, with the explicit-capture
    // template (no init container).
    let (_, patched) = reviewed(port, &ca, &fixture("replicaset-pod.json"), "--http2");
    let pod = patched.unwrap();
    assert_eq!(names(&pod, "initContainers"), Vec::<String>::new());
    assert_eq!(names(&pod, "containers"), ["reviews", "fedmesh-agent"]);
    validate(dir.path(), &pod);

    // Each review counted by outcome on the admin port's /metrics: the
    // three refused bodies (not JSON, v1beta1, too large) and the one
    // injected; a wrong path or method is no review.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{metrics}/metrics"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "fedmesh_federation_injection_reviews_total{outcome=\"invalid\"} 3",
        "fedmesh_federation_injection_reviews_total{outcome=\"injected\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}

#[test]
fn bad_webhook_flags_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let no_agent = dir.path().join("t.yaml");
    std::fs::write(
        &no_agent,
        "spec: {template: {spec: {containers: [{name: app}]}}}",
    )
    .unwrap();
    mesh_test::process::assert_usage_error(
        BIN,
        &["--registry", "memory", "--inject-listen", "127.0.0.1:0"],
        &["--inject-listen needs --inject-template"],
    );
    mesh_test::process::assert_usage_error(
        BIN,
        &[
            "--registry",
            "memory",
            "--inject-listen",
            "127.0.0.1:0",
            "--inject-template",
            no_agent.to_str().unwrap(),
        ],
        &["--inject-template", "no container named fedmesh-agent"],
    );
}

/// A label selector (matchLabels, matchExpressions) evaluated as the API
/// server does.
fn selects(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_label = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let by_expr = selector["matchExpressions"].as_array().is_none_or(|es| {
        es.iter().all(|e| {
            let key = e["key"].as_str().unwrap();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str().unwrap() {
                "In" => get(key).is_some_and(|v| values.contains(&v)),
                "NotIn" => get(key).is_none_or(|v| !values.contains(&v)),
                "Exists" => get(key).is_some(),
                "DoesNotExist" => get(key).is_none(),
                op => panic!("operator {op}"),
            }
        })
    });
    by_label && by_expr
}

#[test]
fn the_chart_registers_the_webhook_for_opted_in_namespaces_with_the_mesh_root() {
    // options: a plug-in root given as ca.rootCert.
    let docs = rendered("helm-options.yaml");
    let hook = object(
        &docs,
        "MutatingWebhookConfiguration",
        "fedmesh-sidecar-injector",
    );
    let w = &hook["webhooks"][0];
    assert_eq!(w["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(w["sideEffects"], "None");
    assert_eq!(w["failurePolicy"], "Fail");
    assert_eq!(
        w["rules"],
        json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}])
    );
    // The API server checks the webhook's certificate against caBundle:
    // the mesh root the chart was given.
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(w["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    let values: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/helm/fedmesh/ci/options-values.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(bundle).unwrap().trim(),
        values["ca"]["rootCert"].as_str().unwrap().trim()
    );
    // It reaches the federation's webhook listener: Service port 443 ->
    // the container port named webhook -> --inject-listen.
    let svc = &w["clientConfig"]["service"];
    assert_eq!(
        (svc["name"].as_str(), svc["path"].as_str()),
        (Some("fedmesh-federation"), Some("/inject"))
    );
    let service = object(&docs, "Service", "fedmesh-federation");
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == svc["port"])
        .expect("the Service exposes the webhook's port");
    assert_eq!(port["targetPort"], "webhook");
    let fed = &object(&docs, "Deployment", "fedmesh-federation")["spec"]["template"]["spec"]
        ["containers"][0];
    let cport = fed["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "webhook")
        .unwrap();
    let listen = format!("--inject-listen=0.0.0.0:{}", cport["containerPort"]);
    assert!(
        fed["args"].as_array().unwrap().contains(&json!(listen)),
        "{}",
        fed["args"]
    );

    // Which Pods the API server sends: those of opted-in namespaces, not
    // the mesh's own or the system's, not those opting out by label.
    let ns = |name: &str, inject: Option<&str>| {
        let mut l = json!({"kubernetes.io/metadata.name": name});
        if let Some(v) = inject {
            l["fedmesh.io/inject"] = json!(v);
        }
        l
    };
    let sent = |namespace: &Value, pod: &Value| {
        selects(&w["namespaceSelector"], namespace) && selects(&w["objectSelector"], pod)
    };
    let plain = json!({"app.kubernetes.io/name": "reviews"});
    assert!(sent(&ns("shop", Some("enabled")), &plain));
    assert!(!sent(&ns("shop", None), &plain));
    assert!(!sent(&ns("shop", Some("disabled")), &plain));
    assert!(!sent(&ns("fedmesh-system", Some("enabled")), &plain));
    assert!(!sent(&ns("kube-system", Some("enabled")), &plain));
    assert!(!sent(
        &ns("shop", Some("enabled")),
        &json!({"app.kubernetes.io/name": "reviews", "fedmesh.io/inject": "false"})
    ));

    // Without a root to put in caBundle (the default), no registration is
    // rendered: nothing would call a webhook it cannot trust.
    let default = rendered("helm-default.yaml");
    assert!(!default
        .iter()
        .any(|d| d["kind"] == "MutatingWebhookConfiguration"));
}

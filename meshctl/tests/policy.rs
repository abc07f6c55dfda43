//! `meshctl validate`, `apply`, `get` and `delete`: the real binary against a
//! real federation on loopback. What a user sees: tables and JSON on stdout,
//! warnings and every error on stderr, exit code 1 on any refusal, and
//! nothing stored from a file with a bad document.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::app::Bound;
use federation::config::Config;
use mesh_core::name::Namespace;
use mesh_core::policy::{parse_yaml, Document};
use mesh_test::etcd::EtcdFixture;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_meshctl");
/// Longest one meshctl run may take (its own request timeout is 15 s).
const RUN_PATIENCE: Duration = Duration::from_secs(40);
const PATIENCE: Duration = Duration::from_secs(10);

// === harness ===

/// What one meshctl run printed, and how it ended.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts success with nothing on stderr.
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
        self
    }

    /// Asserts exit code 1 with nothing on stdout; returns stderr.
    fn failed(self) -> String {
        assert_eq!(self.code, 1, "{self:?}");
        assert_eq!(self.stdout, "", "nothing on stdout on failure: {self:?}");
        assert!(
            self.stderr.starts_with("meshctl: "),
            "errors start with meshctl: {self:?}"
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("backtrace"),
            "{self:?}"
        );
        self.stderr
    }

    /// The table on stdout, cells split on blanks.
    fn table(&self) -> Vec<Vec<String>> {
        self.stdout
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs meshctl off the async runtime's threads, with `stdin` as its input,
/// and kills it if it runs longer than [`RUN_PATIENCE`].
async fn run(args: &[&str], stdin: Option<&str>) -> Out {
    run_with(&no_config(), args, stdin).await
}

/// A configuration path where there is none (validate needs no federation).
fn no_config() -> PathBuf {
    std::env::temp_dir().join(format!("fedmesh-no-config-{}.yaml", std::process::id()))
}

/// A configuration whose context trusts a CA of its own and holds a
/// certificate from it, for `url` (nothing answers there).
fn config_for_nowhere(url: &str) -> (tempfile::TempDir, PathBuf) {
    let ca = mesh_test::tls::TestCa::new();
    let leaf = ca.issue(&[], Some("spiffe://cluster.local/fedmesh/operator/nobody"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let mut file = mesh_core::client_config::ClientConfig::default();
    file.upsert(mesh_core::client_config::Context {
        name: "nowhere".into(),
        server: url.into(),
        certificate_authority_data: ca.pem.clone(),
        client_certificate_data: leaf.cert_pem.clone(),
        client_key_data: leaf.key_pem.clone(),
    });
    file.save(&path).unwrap();
    (dir, path)
}

async fn run_with(cfg: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let stdin = stdin.map(str::to_string);
    let cfg = cfg.to_path_buf();
    tokio::task::spawn_blocking(move || run_blocking(&cfg, &args, stdin))
        .await
        .unwrap()
}

fn run_blocking(cfg: &Path, args: &[String], stdin: Option<String>) -> Out {
    let mut child = Command::new(BIN)
        .args(args)
        .env("FEDMESH_CONFIG", cfg)
        .env_remove("FEDMESH_CONTEXT")
        .env_remove("FEDMESH_FEDERATION")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshctl");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(text.as_bytes());
        });
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + RUN_PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("meshctl {args:?} did not finish within {RUN_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A file of this crate's `tests/testdata`, by absolute path.
fn testdata(name: &str) -> String {
    format!("{}/tests/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory of one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("meshctl-policy-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `text` to `name` and returns its path.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A federation on the embedded registry, and meshctl pointed at it.
struct Mesh {
    fed: Option<Bound>,
    url: String,
    etcd: Option<EtcdFixture>,
    /// meshctl's configuration: an admin of the federation.
    cfg: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Self {
        Self::with_config(Config::embedded(([127, 0, 0, 1], 0).into()), None).await
    }

    async fn with_config(cfg: Config, etcd: Option<EtcdFixture>) -> Self {
        let fed = federation::app::build(&cfg).await.unwrap();
        tokio::time::timeout(PATIENCE, fed.shared.wait_synced())
            .await
            .expect("the federation reads its registry in time");
        let (dir, cfg) = common::admin_config(&fed).await;
        Self {
            url: fed.url(),
            fed: Some(fed),
            etcd,
            cfg,
            _dir: dir,
        }
    }

    /// Runs `meshctl --federation URL ARGS...`.
    async fn ctl(&self, args: &[&str]) -> Out {
        let mut all = vec!["--federation", self.url.as_str()];
        all.extend_from_slice(args);
        run_with(&self.cfg, &all, None).await
    }

    async fn ctl_stdin(&self, args: &[&str], stdin: &str) -> Out {
        let mut all = vec!["--federation", self.url.as_str()];
        all.extend_from_slice(args);
        run_with(&self.cfg, &all, Some(stdin)).await
    }

    /// `meshctl get -o json`: the stored documents.
    async fn stored(&self) -> Vec<Value> {
        let out = self.ctl(&["get", "-o", "json"]).await.ok();
        out.json().as_array().unwrap().clone()
    }

    async fn stop(mut self) {
        if let Some(fed) = self.fed.take() {
            fed.shutdown(Duration::from_secs(5)).await.unwrap();
        }
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(ToString::to_string).collect()
}

const HEADER: [&str; 4] = ["KIND", "NAMESPACE", "NAME", "RESULT"];

/// The documents of a file as meshctl stores them (canonical JSON).
fn canonical(path: &str, ns: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    parse_yaml(path, &text, &Namespace::new(ns).unwrap())
        .unwrap()
        .documents
        .iter()
        .map(Document::to_json)
        .collect()
}

/// `kind ns/name` of stored documents, sorted.
fn keys(docs: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    v.sort();
    v
}

/// The good file with the VirtualService's weights changed.
fn reweighted(v1: u32, v2: u32) -> String {
    std::fs::read_to_string(testdata("good.yaml"))
        .unwrap()
        .replace("weight: 90", &format!("weight: {v1}"))
        .replace("weight: 10", &format!("weight: {v2}"))
}

/// A port nobody listens on.
fn dead_url() -> String {
    format!("https://127.0.0.1:{}", mesh_test::free_port())
}

// === validate: local, needs no federation ===

#[tokio::test]
async fn validate_prints_a_row_per_valid_document() {
    let good = testdata("good.yaml");
    // Pointed at nothing: validate never contacts the federation.
    let dead = dead_url();
    let out = run(&["--federation", &dead, "validate", "-f", &good], None)
        .await
        .ok();
    assert_eq!(
        out.table(),
        [
            row(&HEADER),
            row(&["VirtualService", "default", "reviews", "valid"]),
            row(&["DestinationRule", "default", "reviews", "valid"]),
        ]
    );

    // -n gives the namespace of documents that name none.
    let out = run(&["validate", "-f", &good, "-n", "shop"], None)
        .await
        .ok();
    assert_eq!(
        out.table()[1..],
        [
            row(&["VirtualService", "shop", "reviews", "valid"]),
            row(&["DestinationRule", "shop", "reviews", "valid"]),
        ]
    );

    let out = run(&["validate", "-f", &good, "-o", "json"], None)
        .await
        .ok();
    assert_eq!(
        out.json(),
        json!([
            {"kind": "VirtualService", "namespace": "default", "name": "reviews", "result": "valid"},
            {"kind": "DestinationRule", "namespace": "default", "name": "reviews", "result": "valid"},
        ])
    );

    let err = run(&["validate", "-f", &good, "-n", "Bad_NS"], None)
        .await
        .failed();
    assert!(err.starts_with("meshctl: invalid --namespace: "), "{err}");
    assert!(err.contains("Bad_NS"), "{err}");
}

#[tokio::test]
async fn validate_warns_on_stderr_about_fields_not_acted_on() {
    let warn = testdata("warn.yaml");
    let out = run(&["validate", "-f", &warn], None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.table(),
        [
            row(&HEADER),
            row(&["VirtualService", "shop", "frontend", "valid"])
        ]
    );
    assert_eq!(
        out.stderr,
        format!(
            "warning: {warn}: document 1 (VirtualService shop/frontend): spec.http[0].corsPolicy: \
             recognised Istio field, accepted but not acted on by fedmesh\n"
        )
    );
    // JSON stays clean for programs: warnings are not mixed into stdout.
    let out = run(&["validate", "-f", &warn, "-o", "json"], None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()[0]["result"], "valid");
    assert!(out.stderr.starts_with("warning: "), "{out:?}");
}

#[tokio::test]
async fn validate_lists_every_error_with_file_document_and_path() {
    let bad = testdata("bad.yaml");
    let err = run(&["validate", "-f", &bad], None).await.failed();
    let want = [
        format!("meshctl: {bad}: document 1 (VirtualService default/reviews): spec.http[0].retries.attempts: must be >= 0, got -2"),
        format!("{bad}: document 1 (VirtualService default/reviews): spec.http[0].route[0].weight: must be >= 0, got -1"),
        format!("{bad}: document 3 (DestinationRule default/reviews): spec.subsets[0].name: invalid subset name \"v_1\": must contain only lowercase letters, digits and '-' (RFC 1123 label)"),
        format!("{bad}: document 4: invalid YAML: did not find expected ',' or ']' at line 43 column 1, while parsing a flow sequence at line 42 column 12"),
    ];
    assert_eq!(err.lines().collect::<Vec<_>>(), want, "{err}");

    let mixed = testdata("mixed.yaml");
    let err = run(&["validate", "-f", &mixed], None).await.failed();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "meshctl: {mixed}: document 2 (VirtualService default/ratings): spec.http[0].timeoutz: unknown field `timeoutz`"
        )),
        "{err}"
    );

    // Several files are one set: a good file beside a bad one prints no rows.
    let good = testdata("good.yaml");
    let err = run(&["validate", "-f", &good, "-f", &bad], None)
        .await
        .failed();
    assert_eq!(err.lines().count(), 4, "{err}");
    assert!(!err.contains("good.yaml"), "{err}");
    // JSON output does not change where errors go.
    run(&["validate", "-f", &bad, "-o", "json"], None)
        .await
        .failed();
}

#[tokio::test]
async fn validate_refuses_missing_and_empty_files() {
    let scratch = Scratch::new("missing");
    let missing = scratch.0.join("nope.yaml").display().to_string();
    let err = run(&["validate", "-f", &missing], None).await.failed();
    assert!(
        err.starts_with(&format!("meshctl: cannot read {missing}: ")),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
    // A missing file among good ones still fails the whole command.
    let good = testdata("good.yaml");
    run(&["validate", "-f", &good, "-f", &missing], None)
        .await
        .failed();

    let empty = scratch.file("empty.yaml", "");
    let err = run(&["validate", "-f", &empty], None).await.failed();
    assert_eq!(err, format!("meshctl: {empty}: no documents\n"));
    let comments = scratch.file("comments.yaml", "# nothing yet\n---\n");
    let err = run(&["validate", "-f", &comments], None).await.failed();
    assert_eq!(err, format!("meshctl: {comments}: no documents\n"));

    // No -f at all is a usage error.
    let out = run(&["validate"], None).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("--filename"), "{out:?}");
}

#[tokio::test]
async fn validate_reads_stdin() {
    let text = std::fs::read_to_string(testdata("good.yaml")).unwrap();
    let out = run(&["validate", "-f", "-"], Some(&text)).await.ok();
    assert_eq!(
        out.table()[1..],
        [
            row(&["VirtualService", "default", "reviews", "valid"]),
            row(&["DestinationRule", "default", "reviews", "valid"]),
        ]
    );
    let bad = std::fs::read_to_string(testdata("bad.yaml")).unwrap();
    let err = run(&["validate", "-f", "-"], Some(&bad)).await.failed();
    assert!(
        err.starts_with("meshctl: <stdin>: document 1 (VirtualService default/reviews): "),
        "{err}"
    );
    assert!(err.contains("<stdin>: document 4: invalid YAML"), "{err}");
    let err = run(&["validate", "-f", "-"], Some("")).await.failed();
    assert_eq!(err, "meshctl: <stdin>: no documents\n");
}

// === apply ===

#[tokio::test]
async fn apply_prints_created_configured_unchanged() {
    let mesh = Mesh::start().await;
    let scratch = Scratch::new("apply");
    let good = testdata("good.yaml");

    let out = mesh.ctl(&["apply", "-f", &good]).await.ok();
    assert_eq!(
        out.table(),
        [
            row(&HEADER),
            row(&["VirtualService", "default", "reviews", "created"]),
            row(&["DestinationRule", "default", "reviews", "created"]),
        ]
    );
    assert_eq!(mesh.stored().await.len(), 2);

    let out = mesh.ctl(&["apply", "-f", &good]).await.ok();
    assert_eq!(
        out.table()[1..],
        [
            row(&["VirtualService", "default", "reviews", "unchanged"]),
            row(&["DestinationRule", "default", "reviews", "unchanged"]),
        ]
    );

    let edited = scratch.file("edited.yaml", &reweighted(50, 50));
    let out = mesh.ctl(&["apply", "-f", &edited]).await.ok();
    assert_eq!(
        out.table()[1..],
        [
            row(&["VirtualService", "default", "reviews", "configured"]),
            row(&["DestinationRule", "default", "reviews", "unchanged"]),
        ]
    );
    let stored = mesh
        .ctl(&["get", "VirtualService", "reviews", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        stored,
        Value::Array(canonical(&edited, "default")[..1].to_vec())
    );

    let out = mesh.ctl(&["apply", "-f", &edited, "-o", "json"]).await.ok();
    assert_eq!(
        out.json(),
        json!([
            {"kind": "VirtualService", "namespace": "default", "name": "reviews", "result": "unchanged"},
            {"kind": "DestinationRule", "namespace": "default", "name": "reviews", "result": "unchanged"},
        ])
    );

    // Several files in one apply; warnings on stderr, rows on stdout.
    let warn = testdata("warn.yaml");
    let out = mesh
        .ctl(&["apply", "-f", &good, "-f", &warn, "-n", "staging"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.table()[1..],
        [
            row(&["VirtualService", "staging", "reviews", "created"]),
            row(&["DestinationRule", "staging", "reviews", "created"]),
            row(&["VirtualService", "shop", "frontend", "created"]),
        ]
    );
    assert!(
        out.stderr.starts_with(&format!(
            "warning: {warn}: document 1 (VirtualService shop/frontend): spec.http[0].corsPolicy: "
        )),
        "{out:?}"
    );
    assert_eq!(
        keys(&mesh.stored().await),
        [
            "DestinationRule default/reviews",
            "DestinationRule staging/reviews",
            "VirtualService default/reviews",
            "VirtualService shop/frontend",
            "VirtualService staging/reviews",
        ]
    );
    mesh.stop().await;
}

#[tokio::test]
async fn apply_dry_run_prints_and_stores_nothing() {
    let mesh = Mesh::start().await;
    let scratch = Scratch::new("dry-run");
    let good = testdata("good.yaml");

    let out = mesh.ctl(&["apply", "-f", &good, "--dry-run"]).await.ok();
    assert_eq!(
        out.stdout,
        "KIND              NAMESPACE   NAME      RESULT\n\
         VirtualService    default     reviews   created (dry run)\n\
         DestinationRule   default     reviews   created (dry run)\n"
    );
    assert_eq!(mesh.stored().await, Vec::<Value>::new());
    // The table of an empty federation is its header alone.
    let out = mesh.ctl(&["get"]).await.ok();
    assert_eq!(
        out.table(),
        [row(&["KIND", "NAMESPACE", "NAME", "REVISION"])]
    );

    mesh.ctl(&["apply", "-f", &good]).await.ok();
    let edited = scratch.file("edited.yaml", &reweighted(10, 90));
    let out = mesh.ctl(&["apply", "-f", &edited, "--dry-run"]).await.ok();
    assert!(
        out.stdout.contains("configured (dry run)") && out.stdout.contains("unchanged (dry run)"),
        "{out:?}"
    );
    let stored = mesh.stored().await;
    assert_eq!(
        stored,
        canonical(&good, "default"),
        "still the first version"
    );

    // A dry run of a bad file is refused like the real thing.
    let bad = testdata("mixed.yaml");
    mesh.ctl(&["apply", "-f", &bad, "--dry-run"]).await.failed();
    mesh.stop().await;
}

#[tokio::test]
async fn apply_with_a_bad_document_applies_nothing() {
    let mesh = Mesh::start().await;
    let mixed = testdata("mixed.yaml");
    let err = mesh.ctl(&["apply", "-f", &mixed]).await.failed();
    assert!(
        err.starts_with(&format!(
            "meshctl: {mixed}: document 2 (VirtualService default/ratings): spec.http[0].timeoutz: "
        )),
        "{err}"
    );
    assert_eq!(mesh.stored().await, Vec::<Value>::new());

    // A good file beside a bad one: still nothing.
    let good = testdata("good.yaml");
    let bad = testdata("bad.yaml");
    let err = mesh.ctl(&["apply", "-f", &good, "-f", &bad]).await.failed();
    assert_eq!(err.lines().count(), 4, "every error: {err}");
    assert_eq!(mesh.stored().await, Vec::<Value>::new());

    // Nor does a bad file change what is stored.
    mesh.ctl(&["apply", "-f", &good]).await.ok();
    let before = mesh.stored().await;
    mesh.ctl(&["apply", "-f", &bad]).await.failed();
    assert_eq!(mesh.stored().await, before);
    mesh.stop().await;
}

// === get ===

#[tokio::test]
async fn get_lists_filters_and_prints_documents() {
    let mesh = Mesh::start().await;
    let good = testdata("good.yaml");
    let warn = testdata("warn.yaml");
    mesh.ctl(&["apply", "-f", &good]).await.ok();
    let out = mesh
        .ctl(&["apply", "-f", &good, "-f", &warn, "-n", "shop"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");

    let out = mesh.ctl(&["get"]).await.ok();
    let t = out.table();
    assert_eq!(t[0], row(&["KIND", "NAMESPACE", "NAME", "REVISION"]));
    let mut listed: Vec<String> = t[1..]
        .iter()
        .map(|r| format!("{} {}/{}", r[0], r[1], r[2]))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "DestinationRule default/reviews",
            "DestinationRule shop/reviews",
            "VirtualService default/reviews",
            "VirtualService shop/frontend",
            "VirtualService shop/reviews",
        ]
    );
    assert!(
        t[1..]
            .iter()
            .all(|r| r[3].parse::<i64>().is_ok_and(|v| v > 0)),
        "revisions: {out:?}"
    );

    let out = mesh.ctl(&["get", "VirtualService"]).await.ok();
    assert_eq!(out.table().len(), 4, "{out:?}");
    assert!(out.table()[1..].iter().all(|r| r[0] == "VirtualService"));
    let out = mesh
        .ctl(&["get", "VirtualService", "-n", "shop"])
        .await
        .ok();
    assert_eq!(out.table().len(), 3, "{out:?}");
    assert!(out.table()[1..].iter().all(|r| r[1] == "shop"));
    let out = mesh.ctl(&["get", "-n", "nowhere"]).await.ok();
    assert_eq!(out.table().len(), 1, "{out:?}");

    // One document as JSON: what was applied, in canonical form.
    let out = mesh
        .ctl(&[
            "get",
            "VirtualService",
            "reviews",
            "-n",
            "default",
            "-o",
            "json",
        ])
        .await
        .ok();
    let want = canonical(&good, "default");
    assert_eq!(out.json(), json!([want[0]]));
    let docs = out.json();
    let doc = Document::from_json(&docs[0]).expect("get -o json prints valid documents");
    assert_eq!(doc.to_json(), want[0]);
    // Without -n: that name in every namespace.
    let out = mesh
        .ctl(&["get", "VirtualService", "reviews", "-o", "json"])
        .await
        .ok();
    assert_eq!(
        keys(out.json().as_array().unwrap()),
        [
            "VirtualService default/reviews",
            "VirtualService shop/reviews"
        ]
    );

    let err = mesh.ctl(&["get", "Gateway"]).await.failed();
    assert_eq!(
        err,
        "meshctl: invalid KIND: unsupported kind \"Gateway\": expected one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights\n"
    );
    // A NAME without a KIND is read as a KIND, and refused as one.
    let err = mesh.ctl(&["get", "reviews"]).await.failed();
    assert!(
        err.contains("unsupported kind \"reviews\"")
            && err.contains("VirtualService, DestinationRule, Sidecar"),
        "{err}"
    );
    let err = mesh.ctl(&["get", "VirtualService", "nope"]).await.failed();
    assert_eq!(err, "meshctl: nope: not found\n");
    let err = mesh
        .ctl(&["get", "DestinationRule", "frontend", "-n", "shop"])
        .await
        .failed();
    assert_eq!(err, "meshctl: frontend: not found\n");
    mesh.stop().await;
}

// === delete ===

#[tokio::test]
async fn delete_removes_then_names_what_is_not_found() {
    let mesh = Mesh::start().await;
    let scratch = Scratch::new("delete");
    let good = testdata("good.yaml");
    let warn = testdata("warn.yaml");
    mesh.ctl(&["apply", "-f", &good]).await.ok();
    let out = mesh.ctl(&["apply", "-f", &warn]).await;
    assert_eq!(out.code, 0, "{out:?}");

    let out = mesh.ctl(&["delete", "-f", &good]).await.ok();
    assert_eq!(
        out.table(),
        [
            row(&HEADER),
            row(&["VirtualService", "default", "reviews", "deleted"]),
            row(&["DestinationRule", "default", "reviews", "deleted"]),
        ]
    );
    assert_eq!(keys(&mesh.stored().await), ["VirtualService shop/frontend"]);

    let err = mesh.ctl(&["delete", "-f", &good]).await.failed();
    assert_eq!(
        err,
        "meshctl: not found, nothing deleted: VirtualService default/reviews, DestinationRule default/reviews\n"
    );

    // One present, one absent: nothing is deleted, the absent one is named.
    let only_dr = scratch.file(
        "dr.yaml",
        std::fs::read_to_string(&good)
            .unwrap()
            .split("\n---\n")
            .nth(1)
            .unwrap(),
    );
    mesh.ctl(&["apply", "-f", &only_dr]).await.ok();
    let err = mesh.ctl(&["delete", "-f", &good]).await.failed();
    assert_eq!(
        err,
        "meshctl: not found, nothing deleted: VirtualService default/reviews\n"
    );
    assert_eq!(
        keys(&mesh.stored().await),
        [
            "DestinationRule default/reviews",
            "VirtualService shop/frontend"
        ]
    );

    // The namespace counts: the documents of the file in another namespace are absent.
    let err = mesh
        .ctl(&["delete", "-f", &only_dr, "-n", "prod"])
        .await
        .failed();
    assert_eq!(
        err,
        "meshctl: not found, nothing deleted: DestinationRule prod/reviews\n"
    );

    // A bad file is refused before anything is deleted.
    let bad = testdata("bad.yaml");
    mesh.ctl(&["delete", "-f", &bad]).await.failed();
    assert_eq!(mesh.stored().await.len(), 2);

    // stdin works for delete too.
    let text = std::fs::read_to_string(&warn).unwrap();
    let out = mesh.ctl_stdin(&["delete", "-f", "-"], &text).await.ok();
    assert_eq!(
        out.table()[1..],
        [row(&["VirtualService", "shop", "frontend", "deleted"])]
    );
    assert_eq!(
        keys(&mesh.stored().await),
        ["DestinationRule default/reviews"]
    );
    mesh.stop().await;
}

// === the federation or its registry out of reach ===

#[tokio::test]
async fn unreachable_federation_is_named() {
    let dead = dead_url();
    let (_dir, cfg) = config_for_nowhere(&dead);
    let good = testdata("good.yaml");
    for args in [
        vec!["apply", "-f", good.as_str()],
        vec!["apply", "-f", good.as_str(), "--dry-run"],
        vec!["get"],
        vec!["get", "VirtualService", "reviews", "-o", "json"],
        vec!["delete", "-f", good.as_str()],
    ] {
        let mut all = vec!["--federation", dead.as_str()];
        all.extend(args.iter().copied());
        let err = run_with(&cfg, &all, None).await.failed();
        assert!(
            err.starts_with(&format!("meshctl: cannot reach the federation at {dead}: ")),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // The address without a scheme is named with it.
    let hostport = dead.trim_start_matches("https://");
    let err = run_with(&cfg, &["--federation", hostport, "get"], None)
        .await
        .failed();
    assert!(err.contains(&dead), "{err}");
    // A bad file is reported without contacting the federation.
    let bad = testdata("bad.yaml");
    let err = run_with(&cfg, &["--federation", &dead, "apply", "-f", &bad], None)
        .await
        .failed();
    assert!(
        err.starts_with(&format!("meshctl: {bad}: document 1")),
        "{err}"
    );
}

/// The federation is up but its etcd is not: apply is refused saying so,
/// get still shows the last known state.
#[tokio::test]
async fn registry_down_apply_says_unavailable() {
    use clap::Parser;
    let fx = tokio::task::spawn_blocking(EtcdFixture::start)
        .await
        .unwrap();
    let args = federation::config::Args::try_parse_from([
        "fedmesh-federation",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        &format!("etcd://{}", fx.client_addr()),
    ])
    .unwrap();
    let mut mesh = Mesh::with_config(Config::from_args(&args).unwrap(), Some(fx)).await;
    let good = testdata("good.yaml");
    mesh.ctl(&["apply", "-f", &good]).await.ok();

    let mut fx = mesh.etcd.take().unwrap();
    let fx = tokio::task::spawn_blocking(move || {
        fx.stop();
        fx
    })
    .await
    .unwrap();
    mesh_test::assert_eventually!(
        {
            let out = mesh.ctl(&["status", "-o", "json"]).await;
            out.code == 0 && out.json()["registry_reachable"] == false
        },
        Duration::from_secs(25)
    );
    let warn = testdata("warn.yaml");
    let out = mesh.ctl(&["apply", "-f", &warn]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
    let err_line = out.stderr.lines().last().unwrap();
    assert!(
        err_line.starts_with("meshctl: federation unavailable: registry unreachable"),
        "{out:?}"
    );
    let err = mesh.ctl(&["delete", "-f", &good]).await.failed();
    assert!(
        err.starts_with("meshctl: federation unavailable: registry unreachable"),
        "{err}"
    );
    // The last known state is still there to read.
    assert_eq!(mesh.stored().await, canonical(&good, "default"));
    mesh.etcd = Some(fx);
    mesh.stop().await;
}

/// `-f a.yaml -f b.yaml` are "taken together": the same resource in both is
/// a duplicate, as it is within one file, refused before anything is sent.
#[tokio::test]
async fn validate_refuses_the_same_resource_in_two_files() {
    let good = testdata("good.yaml");
    let err = run(&["validate", "-f", &good, "-f", &good], None)
        .await
        .failed();
    assert!(
        err.contains("duplicate VirtualService default/reviews"),
        "{err}"
    );
}

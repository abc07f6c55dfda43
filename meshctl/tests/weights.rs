//! Global weights end to end: a real federation (its leader computing the
//! weights), real agents in three clusters, a real east-west gateway in
//! front of the third, and the `meshctl` binary setting weights, draining
//! and undraining. The split is observed at the backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../mesh-agent/tests/support/mod.rs"]
mod support;

use mesh_test::http::Backend;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use support::{get, stop, ClusterSpec, Mesh};

const BIN: &str = env!("CARGO_BIN_EXE_meshctl");

/// meshctl as the mesh's admin.
async fn meshctl(m: &Mesh, rest: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--federation".to_string(), m.url.clone()];
    args.extend(rest.iter().map(ToString::to_string));
    let cfg = m.meshctl_config();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(&args)
            .env("FEDMESH_CONFIG", &cfg)
            .output()
            .expect("run meshctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Which backend answered each of `n` requests from the frontend agent.
async fn split(outbound: std::net::SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = get(outbound, "reviews:9080", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        *out.entry(r.header("x-backend").to_string()).or_default() += 1;
    }
    out
}

/// Waits until the frontend agent runs weights for reviews that satisfy `ok`.
async fn until_weights(
    a: &mesh_agent::app::Bound,
    what: &str,
    ok: impl Fn(&BTreeMap<String, u32>) -> bool,
) {
    let svc = "default/reviews".parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let w: BTreeMap<String, u32> = a
            .table
            .load()
            .weights(&svc)
            .map(|w| w.iter().map(|(c, v)| (c.to_string(), *v)).collect())
            .unwrap_or_default();
        if ok(&w) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the agent runs {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whitespace runs as one space: table rows compared whatever the widths.
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A Discovery subscriber speaking the real protocol as an agent of
/// `cluster` would, that NACKs every version with `nack` (or never answers
/// at all): what an agent that cannot apply a config looks like to the
/// federation. Unsubscribes when dropped.
struct Subscriber {
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(m: &Mesh, cluster: &str, node: &str, nack: Option<&str>) -> Self {
        use mesh_api::v1 as api;
        use mesh_api::v1::discovery_request::Request as Req;
        let ctx = m
            .fed
            .node_context(
                cluster,
                &format!("spiffe://cluster.local/ns/default/sa/{node}").replace('~', "-"),
            )
            .await
            .unwrap();
        let fed = meshctl::client::Fed::from_context(&ctx, None);
        let ch = meshctl::client::connect(&fed).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(api::DiscoveryRequest {
            request: Some(Req::Subscribe(api::Subscribe {
                node_id: node.into(),
                cluster: cluster.into(),
                kind: api::NodeKind::Agent as i32,
                namespace: "default".into(),
                labels: Default::default(),
            })),
        })
        .await
        .unwrap();
        let mut stream = mesh_api::v1::discovery_client::DiscoveryClient::new(ch)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let nack = nack.map(str::to_string);
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                if let Some(reason) = &nack {
                    let _ = tx
                        .send(api::DiscoveryRequest {
                            request: Some(Req::Nack(api::Nack {
                                version: r.version,
                                reason: reason.clone(),
                                certificate_root_sha256: String::new(),
                            })),
                        })
                        .await;
                }
            }
        });
        // Subscribed once the federation lists it.
        let admin = m.admin().await;
        mesh_test::assert_eventually!(
            mesh_api::v1::admin_client::AdminClient::new(admin.clone())
                .get_status(mesh_api::v1::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .subscribers
                .iter()
                .any(|s| s.node_id == node),
            Duration::from_secs(10)
        );
        Self { task }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `n` draws with probability `p` land `k` times: within 4.5 standard
/// deviations (a false alarm about once in 150,000 runs).
fn plausible(k: usize, n: usize, p: f64) -> bool {
    #[allow(clippy::cast_precision_loss)]
    let (k, n) = (k as f64, n as f64);
    let sd = (n * p * (1.0 - p)).sqrt();
    (k - n * p).abs() <= 4.5 * sd.max(0.5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_weights_steer_real_traffic_across_clusters_and_a_gateway() {
    let m = Mesh::start_with("127.0.0.1", |c| {
        c.weights_interval = Duration::from_millis(200);
    })
    .await;
    m.fed.shared.wait_synced().await;
    for (name, zone) in [("c1", "us-east-1a"), ("c2", "us-east-1b")] {
        m.cluster(ClusterSpec {
            name,
            region: "us-east",
            zone,
            network: "n1",
            gateways: vec![],
        })
        .await;
    }
    // c3 is on another network: reached through its east-west gateway.
    let gw = m.remote_cluster("c3", "n3", &[]).await;
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    for (c, r, z) in [
        ("c1", "us-east", "us-east-1a"),
        ("c2", "us-east", "us-east-1b"),
        ("c3", "eu-west", "eu-west-1a"),
    ] {
        let b = Backend::start(&format!("reviews-{c}")).await;
        let mut args = m.args(c, r, z, "reviews", b.addr, 9080);
        args.extend(["--id".to_string(), format!("reviews-{c}")]);
        agents.push(m.agent(args).await);
        backends.push(b);
    }
    m.export("reviews", "c3").await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    support::wait_endpoints(&frontend, "reviews", 3).await;

    // No operator weights: locality keeps the frontend's calls in its own cluster.
    until_weights(&frontend, "locality", |w| w.get("c1") == Some(&10_000)).await;
    let s = split(frontend.outbound, 30).await;
    assert_eq!(s.get("reviews-c1"), Some(&30), "{s:?}");

    // A dry run changes nothing and predicts the split.
    let (code, out, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=50,c2=30,c3=20",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run, nothing changed"), "{out}");
    assert!(out.contains("c1=50.0% c2=30.0% c3=20.0%"), "{out}");
    assert!(err.contains("no cluster reports load"), "{err}");

    // Set: the agents follow, and so does the traffic.
    let (code, out, err) = meshctl(&m, &["weights", "set", "reviews", "c1=50,c2=30,c3=20"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("weights set by cluster"), "{out}");
    until_weights(&frontend, "50/30/20", |w| {
        w.get("c1") == Some(&5_000) && w.get("c2") == Some(&3_000) && w.get("c3") == Some(&2_000)
    })
    .await;
    let n = 400;
    let s = split(frontend.outbound, n).await;
    for (b, p) in [
        ("reviews-c1", 0.5),
        ("reviews-c2", 0.3),
        ("reviews-c3", 0.2),
    ] {
        let k = s.get(b).copied().unwrap_or(0);
        assert!(
            plausible(k, n, p),
            "{b}: {k} of {n}, expected about {p}: {s:?}"
        );
    }
    // The gateway carried c3's share.
    assert!(backends[2].requests() > 0);
    // Every request series names both clusters, on both sides.
    let out = support::scrape(
        &frontend,
        "fedmesh_agent_requests_total{direction=\"outbound\",service=\"default/reviews\",code=\"200\",reason=\"\",source_cluster=\"c1\",destination_cluster=\"c3\"}",
    )
    .await;
    assert!(out > 0.0, "no c1 -> c3 series at the frontend");
    let inb = support::scrape(
        &agents[2],
        "fedmesh_agent_requests_total{direction=\"inbound\",service=\"default/reviews\",code=\"200\",reason=\"\",source_cluster=\"c1\",destination_cluster=\"c3\"}",
    )
    .await;
    assert_eq!(inb, out, "the c3 agent counts what the frontend sent it");

    // get and explain show the configured and effective weights.
    let (code, out, _) = meshctl(&m, &["weights", "get", "reviews"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("configured  by cluster: c1=50,c2=30,c3=20"),
        "{out}"
    );
    assert!(out.contains("c1=50.0% c2=30.0% c3=20.0%"), "{out}");
    let (code, out, _) = meshctl(&m, &["weights", "explain", "reviews"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("operator weights by cluster: c1=50,c2=30,c3=20"),
        "{out}"
    );
    // And what bounds the retries they may cause.
    assert!(
        out.contains("retries that cross to another cluster: at most 20% of each agent's requests to the service over 10 s, plus 10 per second"),
        "{out}"
    );

    // A name that is neither a cluster nor a region: meshctl refuses it
    // before it asks the federation.
    let (code, _, err) = meshctl(&m, &["weights", "set", "reviews", "c9=100"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("c9 is neither a registered cluster nor a region"),
        "{err}"
    );

    // The federation's guardrail: all the traffic to a registered cluster
    // with no healthy endpoint of the service is refused, and nothing moves.
    m.cluster(ClusterSpec {
        name: "c4",
        region: "us-east",
        zone: "us-east-1c",
        network: "n1",
        gateways: vec![],
    })
    .await;
    let (code, _, err) = meshctl(&m, &["weights", "set", "reviews", "c4=100"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "refused: no cluster given traffic (c4) has a healthy endpoint of default/reviews"
        ),
        "{err}"
    );
    let configured = |out: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(out).unwrap()["configured"].clone()
    };
    let (_, out, _) = meshctl(&m, &["weights", "get", "reviews", "-o", "json"]).await;
    let c = configured(&out);
    assert_eq!(
        c["weights"]["c1"], 50,
        "the refused setting was written: {c}"
    );
    let rev = c["revision"].as_i64().unwrap();

    // --if-revision: a stale revision is ABORTED and changes nothing; -1
    // ("only if none is set") too; the current one applies.
    let stale = (rev - 1).to_string();
    let (code, _, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=60,c2=20,c3=20",
            "--if-revision",
            &stale,
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "are at revision {rev}, not {stale}: read them again"
        )),
        "{err}"
    );
    let (code, _, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=60,c2=20,c3=20",
            "--if-revision=-1",
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("already set (revision {rev})")),
        "{err}"
    );
    let (_, out, _) = meshctl(&m, &["weights", "get", "reviews", "-o", "json"]).await;
    assert_eq!(configured(&out)["revision"].as_i64(), Some(rev), "{out}");
    // --wait: returns once every agent of every calling cluster ACKed the
    // config version carrying the new weights, and says so per cluster.
    let (code, out, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=60,c2=20,c3=20",
            "--if-revision",
            &rev.to_string(),
            "--wait=30s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("weights set by cluster"), "{out}");
    assert!(err.contains("in effect: every agent runs version"), "{err}");
    // c1 runs the frontend's and reviews' agents; c4 none.
    for row in [
        "c1      2       2        0       0",
        "c2      1       1        0       0",
        "c3      1       1        0       0",
    ] {
        assert!(squeeze(&out).contains(&squeeze(row)), "{row} in\n{out}");
    }
    // In effect means the agent runs them: no waiting here.
    let w: BTreeMap<String, u32> = frontend
        .table
        .load()
        .weights(&"default/reviews".parse().unwrap())
        .map(|w| w.iter().map(|(c, v)| (c.to_string(), *v)).collect())
        .unwrap_or_default();
    assert_eq!(w.get("c1"), Some(&6_000), "{w:?}");

    // Bad input: a --wait that is no duration, and a negative revision
    // asked of the federation, are refused by name, and nothing changes.
    let (code, _, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=10,c2=10,c3=80",
            "--wait=soon",
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid --wait=soon"), "{err}");
    let (_, out, _) = meshctl(&m, &["weights", "get", "reviews", "-o", "json"]).await;
    assert_eq!(configured(&out)["weights"]["c3"], 20, "{out}");
    let e = mesh_api::v1::traffic_client::TrafficClient::new(m.admin().await)
        .get_rollout(mesh_api::v1::GetRolloutRequest {
            service: None,
            revision: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("revision: must be 0 or more, got -1"),
        "{e:?}"
    );

    // An agent that refuses the change: --wait stops as soon as every agent
    // answered, names the refusal and its reason, and exits 5.
    let stubborn = Subscriber::start(
        &m,
        "c2",
        "agent~c2~stubborn",
        Some("cannot apply: test refusal"),
    )
    .await;
    let (code, out, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=50,c2=30,c3=20",
            "--wait=30s",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("not in effect: c2: 1 of 2 agents applied version")
            && err.contains("NACKed by agent~c2~stubborn")
            && err.contains("cannot apply: test refusal"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["applied"], true, "{out}");
    assert_eq!(v["rollout"]["complete"], false, "{out}");
    // weights get and status show the same at any time.
    let (_, out, _) = meshctl(&m, &["weights", "get", "reviews"]).await;
    assert!(out.contains("c2 1/2 (1 NACKed)"), "{out}");
    assert!(out.contains("NACK c2: agent~c2~stubborn"), "{out}");
    let (_, out, _) = meshctl(&m, &["status"]).await;
    assert!(out.contains("c2 1/2 (1 NACKed)"), "{out}");
    drop(stubborn);

    // An agent that never answers: --wait gives up at its timeout, exit 5.
    let silent = Subscriber::start(&m, "c3", "agent~c3~silent", None).await;
    let (code, _, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "c1=60,c2=20,c3=20",
            "--wait=2s",
        ],
    )
    .await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("not in effect after 2s: c3: 1 of 2 agents applied version"),
        "{err}"
    );
    drop(silent);
    // Gone: the others applied it, so it is in effect.
    let (code, out, err) = meshctl(&m, &["drain", "c4", "--wait=30s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("c4: drained"), "{out}");
    let (code, _, err) = meshctl(&m, &["undrain", "c4", "--wait=30s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("in effect: every agent runs version"), "{err}");
    until_weights(&frontend, "60/20/20", |w| {
        w.get("c1") == Some(&6_000) && w.get("c2") == Some(&2_000) && w.get("c3") == Some(&2_000)
    })
    .await;

    // The drain guardrail: c1 is the only cluster running the frontend.
    let (code, _, err) = meshctl(&m, &["drain", "c1"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refused: draining c1 leaves no healthy cluster for default/frontend"),
        "{err}"
    );
    let (_, out, _) = meshctl(&m, &["weights", "get", "reviews", "-o", "json"]).await;
    let drained = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["drained"];
    assert_eq!(drained, &serde_json::json!([]), "{out}");

    // Drain c2: its share goes to the others in proportion.
    let (code, out, err) = meshctl(&m, &["drain", "c2"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("c2: drained"), "{out}");
    until_weights(&frontend, "c2 drained", |w| !w.contains_key("c2")).await;
    let before = backends[1].requests();
    let s = split(frontend.outbound, 60).await;
    assert_eq!(
        backends[1].requests(),
        before,
        "a drained cluster gets nothing: {s:?}"
    );
    // Undrain: back, with slow start.
    let (code, _, err) = meshctl(&m, &["undrain", "c2"]).await;
    assert_eq!(code, 0, "{err}");
    until_weights(&frontend, "c2 back", |w| {
        w.get("c2").is_some_and(|v| *v > 0)
    })
    .await;

    // A setting with a TTL reverts by itself: back to locality.
    let (code, _, err) = meshctl(
        &m,
        &[
            "weights",
            "set",
            "reviews",
            "us-east=0,eu-west=100",
            "--ttl",
            "2s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    until_weights(&frontend, "all to eu-west", |w| {
        w.get("c3") == Some(&10_000)
    })
    .await;
    until_weights(&frontend, "reverted after the TTL", |w| {
        w.get("c1") == Some(&10_000)
    })
    .await;

    // Every change is in the audit log.
    let (_, out, _) = meshctl(&m, &["audit", "-o", "json"]).await;
    let actions: Vec<String> = serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for want in ["weights_set", "drain", "undrain", "weights_expired"] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} not audited: {actions:?}"
        );
    }
    agents.push(frontend);
    stop(agents).await;
    gw.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_guard_capacity_and_drive_rebalancing() {
    let m = Mesh::start_with("127.0.0.1", |c| {
        c.weights_interval = Duration::from_millis(200);
    })
    .await;
    m.fed.shared.wait_synced().await;
    for (name, zone) in [("c1", "us-east-1a"), ("c2", "us-east-1b")] {
        m.cluster(ClusterSpec {
            name,
            region: "us-east",
            zone,
            network: "n1",
            gateways: vec![],
        })
        .await;
    }
    // c1's reviews can serve 20 requests/s, c2's 200.
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    for (c, z, cap) in [("c1", "us-east-1a", "20"), ("c2", "us-east-1b", "200")] {
        let b = Backend::start(&format!("reviews-{c}")).await;
        let mut args = m.args(c, "us-east", z, "reviews", b.addr, 9080);
        args.extend(
            [
                "--id",
                &format!("reviews-{c}"),
                "--capacity",
                cap,
                "--load-report-interval",
                "500ms",
            ]
            .iter()
            .map(ToString::to_string),
        );
        agents.push(m.agent(args).await);
        backends.push(b);
    }
    let app = Backend::start("frontend").await;
    let frontend = m
        .c1_agent(
            "frontend",
            app.addr,
            8080,
            &["--load-report-interval", "500ms"],
        )
        .await;
    support::wait_endpoints(&frontend, "reviews", 2).await;
    until_weights(&frontend, "locality", |w| w.get("c1") == Some(&10_000)).await;

    // Steady load from the frontend, about 40 requests/s.
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop_load.clone();
        let out = frontend.outbound;
        tokio::spawn(async move {
            let mut failed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if get(out, "reviews:9080", "/", &[]).await.status != 200 {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            failed
        })
    };
    // Reports arrive: the guardrail sees c1 beyond its capacity if all of
    // the frontend's traffic stays there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        let (code, _, err) = meshctl(&m, &["weights", "set", "reviews", "c1=100,c2=0"]).await;
        if code != 0 && err.contains("beyond its measured capacity") {
            break err;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the guardrail never saw the load: {err}"
        );
        if code == 0 {
            let _ = meshctl(&m, &["weights", "clear", "reviews"]).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(err.contains("c1 would get"), "{err}");
    // --force goes past it, audited.
    let (code, out, err) =
        meshctl(&m, &["weights", "set", "reviews", "c1=100,c2=0", "--force"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("forced past"), "{out}{err}");
    let (code, _, _) = meshctl(&m, &["weights", "clear", "reviews"]).await;
    assert_eq!(code, 0);

    // Rebalancing on: c1 admits less of its locality traffic, c2 takes it.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tw.yaml");
    std::fs::write(
        &f,
        "apiVersion: fedmesh.io/v1\nkind: TrafficWeights\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  rebalance: {interval: 1s, maxStep: 0.2}\n",
    )
    .unwrap();
    let (code, _, err) = meshctl(&m, &["apply", "-f", f.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    until_weights(&frontend, "rebalanced toward c2", |w| {
        w.get("c2").is_some_and(|v| *v >= 6_000)
    })
    .await;
    let (code, out, _) = meshctl(&m, &["weights", "explain", "reviews"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("rebalancing: admits"), "{out}");
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        load.await.unwrap(),
        0,
        "no request failed while weights moved"
    );
    assert!(backends[1].requests() > 0);
    let (_, out, _) = meshctl(&m, &["audit", "-o", "json"]).await;
    assert!(out.contains("forced past"), "{out}");
    agents.push(frontend);
    stop(agents).await;
}

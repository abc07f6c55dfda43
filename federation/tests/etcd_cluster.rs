//! The federation on a 3-member etcd cluster on loopback: the leader member
//! is killed with SIGKILL while registrations and weight changes are being
//! acknowledged. No acknowledged write is lost, and the federation keeps
//! serving through the survivors.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::config::{Config, RegistrySpec};
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_api::v1::traffic_client::TrafficClient;
use mesh_test::etcd::EtcdCluster;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

/// What one writer saw: acknowledged writes with when, and the write in
/// flight when it stopped (it may or may not have been applied).
#[derive(Default)]
struct Log {
    acked: Vec<(usize, Instant)>,
    failures: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_no_acknowledged_write() {
    mesh_test::trace_init();
    let mut etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap();
    let mut cfg = Config::embedded("127.0.0.1:0".parse().unwrap());
    cfg.registry = RegistrySpec::Etcd(etcd.endpoints());
    let fed = federation::app::build(&cfg).await.unwrap();
    fed.shared.wait_synced().await;
    let admin = common::admin(&fed).await;
    let mut reg = RegistrationClient::new(admin.clone());
    for c in ["c1", "c2"] {
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(common::cluster_info(c)),
        })
        .await
        .unwrap();
    }
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(common::reviews_endpoint("c2", 100_000)),
    })
    .await
    .unwrap();
    let service = api::ServiceKey {
        namespace: "default".into(),
        name: "reviews".into(),
    };

    // Two writers, one write at a time each, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let regs = Arc::new(Mutex::new(Log::default()));
    let weights = Arc::new(Mutex::new(Log::default()));
    let registrations = {
        let (stop, log, mut reg) = (stop.clone(), regs.clone(), reg.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = reg
                    .register_endpoint(api::RegisterEndpointRequest {
                        endpoint: Some(common::reviews_endpoint("c1", i)),
                    })
                    .await;
                let mut l = log.lock().unwrap();
                match r {
                    Ok(_) => {
                        l.acked.push((i, Instant::now()));
                        i += 1;
                    }
                    // Retried with the same endpoint: an ambiguous failure
                    // is settled by the retry.
                    Err(_) => l.failures += 1,
                }
            }
        })
    };
    let weight_changes = {
        let (stop, log, service) = (stop.clone(), weights.clone(), service.clone());
        let mut traffic = TrafficClient::new(admin.clone());
        tokio::spawn(async move {
            let mut w = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = traffic
                    .set_weights(api::SetWeightsRequest {
                        service: Some(service.clone()),
                        by: "cluster".into(),
                        weights: [("c1".to_string(), w), ("c2".to_string(), 1000 - w)].into(),
                        force: true,
                        ..Default::default()
                    })
                    .await;
                let mut l = log.lock().unwrap();
                match r {
                    Ok(_) => {
                        l.acked.push((w as usize, Instant::now()));
                        w = w % 999 + 1;
                    }
                    Err(_) => l.failures += 1,
                }
            }
        })
    };
    let count = |l: &Arc<Mutex<Log>>| l.lock().unwrap().acked.len();
    mesh_test::assert_eventually!(
        count(&regs) >= 30 && count(&weights) >= 10,
        Duration::from_secs(30)
    );
    let leader = tokio::task::spawn_blocking(move || {
        let i = etcd.wait_leader();
        etcd.kill(i);
        (etcd, i)
    })
    .await
    .unwrap();
    let (etcd, killed) = leader;
    let killed_at = Instant::now();
    let (r0, w0) = (count(&regs), count(&weights));
    // The federation goes on writing through the survivors.
    mesh_test::assert_eventually!(
        count(&regs) >= r0 + 30 && count(&weights) >= w0 + 10,
        Duration::from_secs(60)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    registrations.await.unwrap();
    weight_changes.await.unwrap();

    // Every acknowledged registration is in the registry, read through the
    // federation and straight from a surviving member.
    let regs = Arc::try_unwrap(regs).ok().unwrap().into_inner().unwrap();
    let weights = Arc::try_unwrap(weights).ok().unwrap().into_inner().unwrap();
    let listed = AdminClient::new(admin.clone())
        .list_endpoints(api::ListEndpointsRequest {
            service: Some(service.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    let ids: std::collections::HashSet<String> = listed.iter().map(|e| e.id.clone()).collect();
    let lost: Vec<usize> = regs
        .acked
        .iter()
        .map(|(i, _)| *i)
        .filter(|i| !ids.contains(&format!("r{i}")))
        .collect();
    assert!(lost.is_empty(), "acknowledged registrations lost: {lost:?}");
    let direct = federation::store::etcd::EtcdStore::connect(&etcd.live_endpoints())
        .await
        .unwrap();
    use federation::store::Store as _;
    let stored = direct
        .range("/fedmesh/v1/endpoints/default/reviews/c1/")
        .await
        .unwrap()
        .kvs
        .len();
    assert!(
        stored >= regs.acked.len(),
        "{stored} stored, {} acknowledged",
        regs.acked.len()
    );
    // The last acknowledged weights are the ones in force.
    let last = weights.acked.last().unwrap().0;
    let got = TrafficClient::new(admin.clone())
        .get_weights(api::GetWeightsRequest {
            service: Some(service),
        })
        .await
        .unwrap()
        .into_inner()
        .configured
        .unwrap()
        .weights;
    assert_eq!(got.get("c1").copied(), Some(u32::try_from(last).unwrap()));
    // It serves: the registry is reachable again.
    let st = AdminClient::new(admin)
        .get_status(api::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.registry_reachable, "{st:?}");

    // The figures for docs/registry.md: the longest wait between two
    // acknowledged writes around the kill.
    let gap = |l: &Log| {
        l.acked
            .windows(2)
            .filter(|w| w[1].1 >= killed_at)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    };
    eprintln!(
        "etcd leader m{killed} killed: registrations {} acknowledged ({} failed, longest gap {:?}); weight changes {} acknowledged ({} failed, longest gap {:?})",
        regs.acked.len(),
        regs.failures,
        gap(&regs),
        weights.acked.len(),
        weights.failures,
        gap(&weights),
    );
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
}

//! Fuzzes how the federation reads the registry (etcd or embedded): a batch
//! of watch events (puts of arbitrary bytes, deletes) under fedmesh's keys,
//! decoded by `federation::registry::decode` and applied by
//! `federation::state::State::apply`, as the sync loop does; then what the
//! state feeds: the Discovery delta and snapshot, the weight engine's inputs
//! and explanations. Also the values other code reads from the registry by
//! itself: join and operator token grants, role bindings, audit entries, the
//! leader record.
//!
//! Input: records separated by 0xff. A record's first byte picks the key
//! (low 5 bits: a template below; 0x20: a second cluster or name; 0x40: the
//! key is the record up to its first newline instead), 0x80 makes it a
//! delete; the rest is the value.
//!
//! Properties: never a panic; what decodes re-encodes to a value that
//! decodes to the same entry (the canonical policy JSON is a fixed point);
//! the state after the batch equals the state a full read of the final keys
//! builds (replicas agree whatever order they saw the writes in), and
//! reloading those keys on top of it changes nothing.
#![no_main]

use federation::registry::{self, Entry};
use federation::state::State;
use federation::store::{Event, KeyValue, Range};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

const TEMPLATES: [&str; 26] = [
    "/fedmesh/v1/clusters/{c}",
    "/fedmesh/v1/heartbeats/{c}",
    "/fedmesh/v1/endpoints/default/reviews/{c}/r1",
    "/fedmesh/v1/endpoint-leases/default/reviews/{c}/r1",
    "/fedmesh/v1/exports/default/reviews/{c}",
    "/fedmesh/v1/policy/VirtualService/default/{n}",
    "/fedmesh/v1/policy/DestinationRule/default/{n}",
    "/fedmesh/v1/policy/Sidecar/default/{n}",
    "/fedmesh/v1/policy/AuthorizationPolicy/default/{n}",
    "/fedmesh/v1/policy/PeerAuthentication/default/{n}",
    "/fedmesh/v1/policy/RequestAuthentication/default/{n}",
    "/fedmesh/v1/policy/TrafficWeights/default/{n}",
    "/fedmesh/v1/ca/trust",
    "/fedmesh/v1/weights/default/{n}",
    "/fedmesh/v1/traffic/default/{n}",
    "/fedmesh/v1/drain/{c}",
    "/fedmesh/v1/load/default/reviews/{c}/r1",
    "/fedmesh/v1/probes/{c}",
    "/fedmesh/v1/subscribers/replica-1/{i}",
    "/fedmesh/v1/tokens/{h}",
    "/fedmesh/v1/operator-tokens/{h}",
    "/fedmesh/v1/rbac/operators/{n}",
    "/fedmesh/v1/audit/{i}",
    "/fedmesh/v1/leader",
    "/fedmesh/v1/policy/FutureKind/default/{n}",
    "/fedmesh/v1/endpoints/default/{n}",
];

fn key_of(sel: u8, record: &[u8]) -> (String, &[u8]) {
    if sel & 0x40 != 0 {
        let (k, v) = match record.iter().position(|b| *b == b'\n') {
            Some(i) => (&record[..i], &record[i + 1..]),
            None => (record, &[][..]),
        };
        return (String::from_utf8_lossy(k).into_owned(), v);
    }
    let alt = sel & 0x20 != 0;
    let t = TEMPLATES[usize::from(sel & 0x1f) % TEMPLATES.len()];
    let k = t
        .replace("{c}", if alt { "c2" } else { "c1" })
        .replace("{n}", if alt { "ratings" } else { "reviews" })
        .replace("{i}", if alt { "2" } else { "1" })
        .replace("{h}", if alt { "00" } else { "ab" });
    (k, record)
}

/// What other code decodes from these keys by itself.
fn side_decoders(key: &str, value: &[u8]) {
    use federation::{audit, auth, leader, tokens};
    fn again<T>(v: &T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let back: T = serde_json::from_slice(&serde_json::to_vec(v).expect("serializes"))
            .expect("re-encoded value decodes");
        assert_eq!(&back, v);
    }
    if key.starts_with(tokens::OPERATOR_PREFIX) {
        if let Ok(g) = serde_json::from_slice::<tokens::OperatorGrant>(value) {
            again(&g);
        }
        let _ = tokens::pinned_root(&String::from_utf8_lossy(value));
    } else if key.starts_with(tokens::PREFIX) {
        if let Ok(g) = serde_json::from_slice::<tokens::Grant>(value) {
            again(&g);
        }
        if let Some(pin) = tokens::pinned_root(&String::from_utf8_lossy(value)) {
            assert_eq!(pin.len(), 64);
        }
    } else if key.starts_with(auth::ROLES_PREFIX) {
        if let Ok(b) = serde_json::from_slice::<auth::Binding>(value) {
            again(&b);
        }
    } else if key.starts_with(audit::PREFIX) {
        if let Ok(e) = serde_json::from_slice::<audit::Entry>(value) {
            again(&e);
        }
    } else if key == leader::LEADER_KEY {
        let _ = serde_json::from_slice::<leader::LeaderRecord>(value);
    }
}

/// Decodes one put, and checks that what decoded re-encodes to itself.
fn check_decode(key: &str, value: &[u8]) {
    let (_, entry) = registry::decode(key, value);
    let again = |bytes: Vec<u8>| registry::decode(key, &bytes).1;
    let json = |v: &dyn erased::Ser| v.to_vec();
    match &entry {
        Entry::Cluster(c) => assert_eq!(again(json(c)), entry),
        Entry::Heartbeat(h) => assert_eq!(again(json(h)), entry),
        Entry::Endpoint(e) => assert_eq!(again(json(e)), entry),
        Entry::Export(x) => assert_eq!(again(json(x)), entry),
        Entry::EndpointLease(_, l) => assert_eq!(again(json(l)), entry),
        Entry::Override(_, o) => assert_eq!(again(json(o)), entry),
        Entry::Drain(_, d) => assert_eq!(again(json(d)), entry),
        Entry::Probes(_, p) => assert_eq!(again(json(p)), entry),
        Entry::Trust(t) => assert_eq!(again(t.encode()), entry),
        // The stored form is canonical: decoding it gives it back.
        Entry::Policy(p) => assert_eq!(again(p.json.as_bytes().to_vec()), entry),
        Entry::Invalid { reason } => assert!(!reason.is_empty()),
        // Weights and loads hold floats (compared loosely by the engine);
        // the rest are not ours to re-encode.
        _ => {}
    }
}

mod erased {
    pub trait Ser {
        fn to_vec(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_vec(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("registry values serialize")
        }
    }
}

/// The parts of the state that must not depend on the order of the writes.
fn same_view(a: &State, b: &State) -> bool {
    fn eps(st: &State) -> Vec<(&mesh_core::endpoint::Endpoint, bool)> {
        st.all_endpoints().map(|e| (e, st.endpoint_alive(&e.key()))).collect()
    }
    fn policies(st: &State) -> Vec<(&registry::PolicyKey, &str, i64)> {
        st.policies().iter().map(|(k, p)| (k, &*p.json, p.revision)).collect()
    }
    a.cluster_infos() == b.cluster_infos()
        && eps(a) == eps(b)
        && policies(a) == policies(b)
        && a.services() == b.services()
        && a.trust() == b.trust()
        && a.weights() == b.weights()
        && a.overrides() == b.overrides()
        && a.drains() == b.drains()
        && a.loads() == b.loads()
        && a.probes() == b.probes()
        && a.invalid() == b.invalid()
}

/// The same parts, to show what differs.
fn view(st: &State) -> String {
    let eps: Vec<_> = st.all_endpoints().map(|e| (e.clone(), st.endpoint_alive(&e.key()))).collect();
    format!(
        "{:?}\n{eps:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        st.cluster_infos(),
        st.policies().iter().map(|(k, p)| (k, &p.json, p.revision)).collect::<Vec<_>>(),
        st.services(),
        st.trust(),
        st.weights(),
        st.overrides(),
        st.drains(),
        st.loads(),
        st.probes(),
        st.invalid(),
    )
}

const NOW_MS: u64 = 1_750_000_000_000;

fuzz_target!(|data: &[u8]| {
    let mut events = Vec::new();
    let mut last: BTreeMap<String, KeyValue> = BTreeMap::new();
    for (i, record) in data.split(|b| *b == 0xff).enumerate().take(64) {
        let Some((&sel, rest)) = record.split_first() else { continue };
        let (key, value) = key_of(sel, rest);
        let rev = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if sel & 0x80 != 0 {
            last.remove(&key);
            events.push(Event::Delete { key, mod_revision: rev });
        } else {
            check_decode(&key, value);
            side_decoders(&key, value);
            let kv = KeyValue {
                key: key.clone(),
                value: value.to_vec(),
                create_revision: rev,
                mod_revision: rev,
                lease: 0,
            };
            last.insert(key, kv.clone());
            events.push(Event::Put(kv));
        }
    }
    let revision = i64::try_from(events.len()).unwrap_or(i64::MAX);

    // As the sync loop: one batch of watch events.
    let mut st = State::default();
    let touched = st.apply(&events);
    let delta = st.delta(&touched);
    assert_eq!(delta.version, st.revision());
    let snapshot = st.snapshot();
    assert!(snapshot.last().is_some_and(|c| c.snapshot.is_some_and(|s| s.last)));
    let _ = (st.clusters(), st.lapsed_endpoints());

    // What the leader computes from it.
    let inputs = federation::weights::inputs_from(&st, NOW_MS);
    let _ = federation::weights::demand_from(&st, NOW_MS);
    let services: Vec<_> = st.weights().keys().take(4).cloned().collect();
    for s in &services {
        let _ = federation::weights::explain(&st, s, NOW_MS);
        let mut memory = federation::weights::stored_memory(&st, s);
        let _ = federation::engine::compute(&inputs, &mut memory);
    }

    // A replica that read the final keys in full agrees.
    let range = Range { kvs: last.into_values().collect(), revision };
    let mut fresh = State::default();
    fresh.reload(&range);
    assert!(
        same_view(&st, &fresh),
        "a full read disagrees with the watched batch:\n{}\n---\n{}",
        view(&st),
        view(&fresh)
    );
    // Reading them again on top of the watched state changes nothing.
    let t = st.reload(&range);
    assert!(t.is_empty(), "reloading the same keys touched {t:?}");
});

//! Fuzzes policy YAML as `meshctl validate` and `meshctl apply` read it:
//! `mesh_core::policy::parse_yaml` on any text (the input, lossily UTF-8),
//! with every error and warning formatted as meshctl prints them; then what
//! the federation and agents do with an accepted document: its canonical
//! JSON (`Document::to_json`, what `apply` sends and the registry stores)
//! read back by `Document::from_json`, and the evaluations in mesh-core
//! (AuthorizationPolicy, PeerAuthentication, Sidecar selection,
//! DestinationRule per-subset policy, hosts).
//!
//! Properties: never a panic; errors and warnings name the file and are
//! bounded; every accepted document's canonical JSON reads back to an equal
//! document, both as a JSON value and as YAML text (JSON is YAML); a file
//! whose documents all parse gives the same documents when parsed again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::name::Namespace;
use mesh_core::policy::{self as pol, parse_yaml, Document, Spec};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

const FILE: &str = "fuzz.yaml";

struct Req;

impl pol::AuthzRequest for Req {
    fn source_principal(&self) -> Option<&str> { Some("spiffe://cluster.local/ns/default/sa/productpage") }
    fn source_namespace(&self) -> Option<&str> { Some("default") }
    fn source_cluster(&self) -> Option<&str> { Some("c2") }
    fn source_ip(&self) -> Option<IpAddr> { Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))) }
    fn method(&self) -> &str { "GET" }
    fn path(&self) -> &str { "/reviews/1" }
    fn host(&self) -> &str { "reviews" }
    fn destination_port(&self) -> u16 { 9080 }
    fn header(&self, name: &str) -> Option<&str> { (name == "end-user").then_some("jason") }
    fn jwt_claims(&self) -> Option<&serde_json::Value> { None }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ns = Namespace::new("default").expect("namespace");
    let parsed = match parse_yaml(FILE, &text, &ns) {
        Ok(p) => p,
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                let line = e.to_string();
                assert!(line.starts_with(FILE), "{line}");
            }
            return;
        }
    };
    for w in &parsed.warnings {
        assert!(w.to_string().starts_with(FILE));
    }
    let labels: BTreeMap<String, String> = [("app".to_string(), "reviews".to_string()), ("version".to_string(), "v1".to_string())].into();
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    let mut sidecars = Vec::new();
    for doc in &parsed.documents {
        // The canonical JSON reads back to the same document...
        let json = doc.to_json();
        let back = Document::from_json(&json);
        assert_eq!(back.as_ref(), Ok(doc), "canonical JSON does not read back: {json}");
        // ... also as the text `meshctl apply` sends and YAML readers see.
        let text = json.to_string();
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON text");
        assert_eq!(Document::from_json(&v).as_ref(), Ok(doc));
        let again = parse_yaml(FILE, &text, &ns).map(|p| p.documents);
        assert_eq!(again.as_deref(), Ok(std::slice::from_ref(doc)), "canonical JSON as YAML: {text}");
        let _ = doc.hosts();
        let (_, dns, name) = doc.key();
        match &doc.spec {
            Spec::AuthorizationPolicy(ap) => {
                if ap.selects(dns.as_str(), pol::DEFAULT_ROOT_NAMESPACE, "default", &labels) {
                    authz.push((name, ap));
                }
            }
            Spec::PeerAuthentication(pa) => peer.push((dns.as_str(), pa)),
            Spec::Sidecar(sc) => sidecars.push(sc),
            Spec::DestinationRule(dr) => {
                let _ = dr.policy_for(None, Some(9080));
                let _ = dr.policy_for(Some("v1"), None);
            }
            _ => {}
        }
    }
    let _ = pol::authorize(&authz, &Req);
    let _ = pol::effective_mode(&peer, pol::DEFAULT_ROOT_NAMESPACE, "default", &labels, 9080);
    if let Some(sc) = pol::select_sidecar(sidecars, &labels) {
        let _ = sc.allows("default", "reviews.default.svc.cluster.local", "default");
    }
    // Parsing is a function of the text.
    let twice = parse_yaml(FILE, &text, &ns).expect("parsed once, refused the second time");
    assert_eq!(twice, parsed);
});

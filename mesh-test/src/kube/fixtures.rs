//! The objects of `mesh-test/fixtures/kube/`, in the order they are
//! applied (namespace and nodes first, as a cluster has them). Where their
//! shapes come from: the [`super`] module documentation.

use serde_json::Value;

/// `$(#[$doc])* pub const $name: &[(file name, JSON)]` of the files of
/// `mesh-test/fixtures/kube/$dir`, in the order given.
macro_rules! fixtures {
    ($(#[$doc:meta])* $const:ident, $dir:literal, [$($name:literal),* $(,)?]) => {
        $(#[$doc])*
        pub const $const: &[(&str, &str)] = &[
            $(($name, include_str!(concat!("../../fixtures/kube/", $dir, $name))),)*
        ];
    };
}

fixtures!(
    /// (file name, JSON) of every fixture, in load order.
    FIXTURES,
    "",
    [
        "namespace-bookinfo.json",
        "node-a.json",
        "node-b.json",
        "service-reviews.json",
        "service-ratings.json",
        "pod-reviews-v1.json",
        "pod-reviews-v3.json",
        "pod-ratings-v1.json",
        "endpointslice-reviews.json",
        "endpointslice-ratings.json",
        "serviceexport-reviews.json",
        "virtualservice-reviews.json",
        "destinationrule-reviews.json",
        "trafficweights-reviews.json",
    ]
);

fixtures!(
    /// (file name, JSON) of the recorded k3s cluster's lists
    /// (`mesh-test/fixtures/kube/recorded/k3s/`, byte for byte as recorded:
    /// see the SOURCES.md there), in load order: the Node, Services, Pods,
    /// EndpointSlices.
    RECORDED_K3S,
    "recorded/k3s/",
    [
        "nodes.json",
        "services-default.json",
        "services-kube-system.json",
        "pods-default.json",
        "pods-kube-system.json",
        "endpointslices-default.json",
        "endpointslices-kube-system.json",
    ]
);

/// Every object of the recorded k3s cluster ([`RECORDED_K3S`]), in load
/// order, as recorded (each list item carries its `kind` and `apiVersion`).
///
/// # Panics
///
/// If a recorded file is not a list of objects (a broken fixture).
pub fn recorded_k3s() -> Vec<Value> {
    RECORDED_K3S
        .iter()
        .flat_map(|(name, text)| {
            let list: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("recorded {name}: {e}"));
            match list["items"].as_array() {
                Some(items) => items.clone(),
                None => panic!("recorded {name}: not a list"),
            }
        })
        .collect()
}

/// A fixture by file name (`service-reviews.json`), parsed: e.g. to change
/// it and [`super::KubeApi::apply`] it again.
///
/// # Panics
///
/// If there is no such fixture.
pub fn fixture(name: &str) -> Value {
    let (_, text) = FIXTURES
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no Kubernetes fixture {name}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recorded_object_has_a_kind_and_a_name() {
        let all = recorded_k3s();
        assert_eq!(all.len(), 1 + 4 + 3 + 6 + 7 + 4 + 3);
        for v in all {
            assert!(v["apiVersion"].is_string(), "{v}");
            assert!(v["kind"].is_string(), "{v}");
            assert!(v["metadata"]["name"].is_string(), "{v}");
        }
    }

    #[test]
    fn every_fixture_is_an_object_with_a_name() {
        for (name, _) in FIXTURES {
            let v = fixture(name);
            assert!(v["apiVersion"].is_string(), "{name}");
            assert!(v["kind"].is_string(), "{name}");
            assert!(v["metadata"]["name"].is_string(), "{name}");
        }
    }
}

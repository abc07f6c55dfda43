//! The objects of `mesh-test/fixtures/kube/`, in the order they are
//! applied (namespace and nodes first, as a cluster has them). Where their
//! shapes come from: the [`super`] module documentation.

use serde_json::Value;

macro_rules! fixtures {
    ($($name:literal),* $(,)?) => {
        /// (file name, JSON) of every fixture, in load order.
        pub const FIXTURES: &[(&str, &str)] = &[
            $(($name, include_str!(concat!("../../fixtures/kube/", $name))),)*
        ];
    };
}

fixtures!(
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
);

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
    fn every_fixture_is_an_object_with_a_name() {
        for (name, _) in FIXTURES {
            let v = fixture(name);
            assert!(v["apiVersion"].is_string(), "{name}");
            assert!(v["kind"].is_string(), "{name}");
            assert!(v["metadata"]["name"].is_string(), "{name}");
        }
    }
}

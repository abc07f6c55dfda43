//! The SNI scheme between clusters: Istio's AUTO_PASSTHROUGH names.
//!
//! A client in one cluster reaches service `name.namespace` port `port` (and
//! optionally subset `subset`) in another cluster by opening TLS to that
//! cluster's gateway with the server name
//! `outbound_.<port>_.<subset>_.<name>.<namespace>.svc.cluster.local`, where an
//! empty subset leaves the label as a lone `_`. The gateway routes on this name
//! without decrypting.
//!
//! ```
//! use mesh_core::sni::SniName;
//! let sni = SniName::decode("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
//! assert_eq!(sni.port.get(), 9080);
//! assert!(sni.subset.is_none());
//! assert_eq!(sni.service.to_string(), "default/reviews");
//! assert_eq!(sni.encode(), "outbound_.9080_._.reviews.default.svc.cluster.local");
//! ```

use crate::name::{check_label, Namespace, ServiceName, SubsetName, MAX_DNS_NAME_LEN};
use crate::service::ServiceKey;
use std::fmt;
use std::num::NonZeroU16;

const PREFIX: &str = "outbound_";
const SUFFIX: &str = "svc.cluster.local";

/// A decoded AUTO_PASSTHROUGH server name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SniName {
    /// Destination port of the service.
    pub port: NonZeroU16,
    /// Subset of the service's endpoints, or all of them.
    pub subset: Option<SubsetName>,
    /// Destination service.
    pub service: ServiceKey,
}

/// Why a server name is not a valid AUTO_PASSTHROUGH name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniError {
    /// Longer than a DNS name may be (253 characters).
    #[error("server name is longer than 253 characters")]
    TooLong,
    /// Contains a byte outside letters, digits, `-`, `_` and `.`.
    #[error("server name contains a character that is not a letter, digit, '-', '_' or '.'")]
    BadCharacter,
    /// Does not start with `outbound_.`.
    #[error("server name does not start with 'outbound_.'")]
    NotOutbound,
    /// Does not end with `.svc.cluster.local`.
    #[error("server name does not end with '.svc.cluster.local'")]
    BadSuffix,
    /// Has the wrong number of labels.
    #[error("server name is not of the form outbound_.<port>_.<subset>_.<service>.<namespace>.svc.cluster.local")]
    Shape,
    /// The port label is not `<1..=65535>_` in canonical decimal.
    #[error("port label is not a port number 1 to 65535 followed by '_'")]
    BadPort,
    /// The subset label is not `_` or `<rfc1123-label>_`.
    #[error("subset label is not '_' or a subset name followed by '_'")]
    BadSubset,
    /// The service label is not an RFC 1123 label.
    #[error("service label is not a valid RFC 1123 label")]
    BadService,
    /// The namespace label is not an RFC 1123 label.
    #[error("namespace label is not a valid RFC 1123 label")]
    BadNamespace,
}

impl SniName {
    /// The server name for `service` on `port`, all endpoints or one subset.
    pub fn new(service: ServiceKey, port: NonZeroU16, subset: Option<SubsetName>) -> Self {
        Self {
            port,
            subset,
            service,
        }
    }

    /// The server name as sent in the ClientHello.
    pub fn encode(&self) -> String {
        let subset = self.subset.as_ref().map_or("", SubsetName::as_str);
        format!(
            "{PREFIX}.{}_.{subset}_.{}.{}.{SUFFIX}",
            self.port, self.service.name, self.service.namespace
        )
    }

    /// Decodes a server name. DNS names compare without regard to ASCII case
    /// (RFC 6066 section 3), so upper-case letters are accepted and lowered.
    pub fn decode(name: &str) -> Result<Self, SniError> {
        if name.len() > MAX_DNS_NAME_LEN {
            return Err(SniError::TooLong);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(SniError::BadCharacter);
        }
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        let rest = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(SniError::NotOutbound)?;
        let rest = rest
            .strip_suffix(SUFFIX)
            .and_then(|r| r.strip_suffix('.'))
            .ok_or(SniError::BadSuffix)?;
        let mut labels = rest.split('.');
        let (Some(port), Some(subset), Some(svc), Some(ns), None) = (
            labels.next(),
            labels.next(),
            labels.next(),
            labels.next(),
            labels.next(),
        ) else {
            return Err(SniError::Shape);
        };
        let port = port.strip_suffix('_').ok_or(SniError::BadPort)?;
        // Canonical decimal only, so that each port has exactly one name.
        if port.is_empty()
            || port.len() > 5
            || port.starts_with('0')
            || !port.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(SniError::BadPort);
        }
        let port = port
            .parse::<u16>()
            .ok()
            .and_then(NonZeroU16::new)
            .ok_or(SniError::BadPort)?;
        let subset = subset.strip_suffix('_').ok_or(SniError::BadSubset)?;
        let subset = if subset.is_empty() {
            None
        } else {
            // The label `<subset>_` must itself fit in 63 characters.
            if subset.len() > 62 || check_label(subset).is_err() {
                return Err(SniError::BadSubset);
            }
            Some(SubsetName::new(subset).map_err(|_| SniError::BadSubset)?)
        };
        let name = ServiceName::new(svc).map_err(|_| SniError::BadService)?;
        let namespace = Namespace::new(ns).map_err(|_| SniError::BadNamespace)?;
        Ok(Self {
            port,
            subset,
            service: ServiceKey::new(namespace, name),
        })
    }
}

impl fmt::Display for SniName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(Namespace::new(ns).unwrap(), ServiceName::new(name).unwrap())
    }

    #[test]
    fn istio_examples() {
        let s = SniName::decode("outbound_.9080_.v1_.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(s.port.get(), 9080);
        assert_eq!(s.subset.as_ref().unwrap().as_str(), "v1");
        assert_eq!(s.service, key("default", "reviews"));
        let s = SniName::decode("OUTBOUND_.443_._.Web.Prod.svc.cluster.local").unwrap();
        assert_eq!(s.encode(), "outbound_.443_._.web.prod.svc.cluster.local");
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("", SniError::NotOutbound),
            ("reviews.default.svc.cluster.local", SniError::NotOutbound),
            (
                "inbound_.9080_._.reviews.default.svc.cluster.local",
                SniError::NotOutbound,
            ),
            (
                "outbound_.9080_._.reviews.default.svc.cluster.local.",
                SniError::BadSuffix,
            ),
            (
                "outbound_.9080_._.reviews.default.svc.example.com",
                SniError::BadSuffix,
            ),
            (
                "outbound_.9080_.reviews.default.svc.cluster.local",
                SniError::Shape,
            ),
            (
                "outbound_.9080_._.a.reviews.default.svc.cluster.local",
                SniError::Shape,
            ),
            (
                "outbound_.0_._.reviews.default.svc.cluster.local",
                SniError::BadPort,
            ),
            (
                "outbound_.65536_._.reviews.default.svc.cluster.local",
                SniError::BadPort,
            ),
            (
                "outbound_.09080_._.reviews.default.svc.cluster.local",
                SniError::BadPort,
            ),
            (
                "outbound_.9080._.reviews.default.svc.cluster.local",
                SniError::BadPort,
            ),
            (
                "outbound_.+80_._.reviews.default.svc.cluster.local",
                SniError::BadCharacter,
            ),
            (
                "outbound_.80_.v_1_.reviews.default.svc.cluster.local",
                SniError::BadSubset,
            ),
            (
                "outbound_.80_.v1.reviews.default.svc.cluster.local",
                SniError::BadSubset,
            ),
            (
                "outbound_.80_._.re_views.default.svc.cluster.local",
                SniError::BadService,
            ),
            (
                "outbound_.80_._.reviews.-default.svc.cluster.local",
                SniError::BadNamespace,
            ),
            (
                "outbound_.80_._.reviews.default.svc.cluster.lo\u{e9}",
                SniError::BadCharacter,
            ),
        ];
        for (name, want) in cases {
            assert_eq!(SniName::decode(name), Err(want), "{name:?}");
        }
        let long = format!(
            "outbound_.80_._.{}.default.svc.cluster.local",
            "a".repeat(240)
        );
        assert_eq!(SniName::decode(&long), Err(SniError::TooLong));
        let label64 = format!(
            "outbound_.80_._.{}.default.svc.cluster.local",
            "a".repeat(64)
        );
        assert_eq!(SniName::decode(&label64), Err(SniError::BadService));
        let subset63 = format!(
            "outbound_.80_.{}_.r.default.svc.cluster.local",
            "a".repeat(63)
        );
        assert_eq!(SniName::decode(&subset63), Err(SniError::BadSubset));
    }

    const LABEL: &str = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";

    fn sni_strategy() -> impl Strategy<Value = SniName> {
        (
            1u16..=u16::MAX,
            proptest::option::of("[a-z0-9]([a-z0-9-]{0,60}[a-z0-9])?"),
            LABEL,
            LABEL,
        )
            .prop_map(|(port, subset, name, ns)| {
                SniName::new(
                    key(&ns, &name),
                    NonZeroU16::new(port).unwrap(),
                    subset.map(|s| SubsetName::new(s).unwrap()),
                )
            })
    }

    proptest! {
        #[test]
        fn decode_encode_roundtrip(x in sni_strategy()) {
            let encoded = x.encode();
            prop_assert!(encoded.len() <= MAX_DNS_NAME_LEN);
            prop_assert_eq!(SniName::decode(&encoded), Ok(x));
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,300}") {
            let _ = SniName::decode(&s);
        }

        #[test]
        fn near_misses_never_panic(s in "outbound_\\.[0-9_]{0,7}\\.[a-z0-9_-]{0,70}\\.[a-zA-Z0-9._-]{0,90}") {
            if let Ok(x) = SniName::decode(&s) {
                // Anything accepted is canonical up to case.
                prop_assert_eq!(x.encode(), s.to_ascii_lowercase());
            }
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = SniName::decode(&String::from_utf8_lossy(&b));
        }
    }
}

//! Types shared by the three policy kinds: durations, percentages, string
//! matches, destinations and header operations.

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

// === PolicyDuration ===

/// A duration written in Istio's string form (`"500ms"`, `"1.5s"`, `"1h30m"`).
///
/// Deserialization accepts any non-negative duration that
/// [`crate::duration::parse`] accepts; the range rules Istio applies to most
/// fields (at least 1ms, whole milliseconds) are checked by validation, which
/// names the field. Serializes back to a string that parses to the same value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyDuration(pub Duration);

impl PolicyDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parses Istio's string form.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('-') {
            return Err(format!(
                "invalid duration {:?}: must not be negative",
                s.chars().take(40).collect::<String>()
            ));
        }
        crate::duration::parse(s)
            .map(Self)
            .map_err(|e| e.to_string())
    }
}

impl From<Duration> for PolicyDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Display for PolicyDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Use the largest unit that represents the value exactly, so the text
        // parses back to the same duration.
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            f.write_str("0s")
        } else if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            write!(f, "{}us", nanos / 1_000)
        } else {
            write!(f, "{nanos}ns")
        }
    }
}

impl Serialize for PolicyDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PolicyDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"1.5s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PolicyDuration, E> {
                PolicyDuration::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

// === Percent ===

/// A percentage in `[0.0, 100.0]` (Istio's `Percent` message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    /// The percentage, 0 to 100; absent means 0.
    #[serde(default)]
    pub value: f64,
}

impl Percent {
    /// The percentage as a fraction in `[0, 1]` (clamped).
    pub fn fraction(self) -> f64 {
        if self.value.is_nan() {
            return 0.0;
        }
        (self.value / 100.0).clamp(0.0, 1.0)
    }
}

// === StringMatch ===

/// Longest regex Istio accepts (it approximates Envoy's RE2 program-size limit by length).
pub const MAX_REGEX_LEN: usize = 1024;

/// A regex compiled with full-match semantics, as Envoy's `safe_regex` (RE2)
/// applies it: the pattern must match the whole value. Compares by source text.
#[derive(Clone)]
pub struct MatchRegex {
    source: String,
    anchored: Regex,
}

impl MatchRegex {
    /// Compiles `source`, anchored as `^(?:source)$`. The error is a one-line reason.
    pub fn new(source: &str) -> Result<Self, String> {
        if source.len() > MAX_REGEX_LEN {
            return Err(format!(
                "regex is too long: {} bytes, at most {MAX_REGEX_LEN} allowed",
                source.len()
            ));
        }
        // Compile the pattern alone first, so that a stray `)` is reported
        // rather than silently closing our anchoring group.
        Regex::new(source).map_err(|e| {
            format!(
                "invalid regex {:?}: {}",
                truncate(source, 80),
                regex_reason(&e)
            )
        })?;
        let anchored = Regex::new(&format!("^(?:{source})$")).map_err(|e| {
            format!(
                "invalid regex {:?}: {}",
                truncate(source, 80),
                regex_reason(&e)
            )
        })?;
        Ok(Self {
            source: source.to_string(),
            anchored,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches all of `value`.
    pub fn is_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

/// The useful line of a `regex` error: its syntax errors span several lines
/// (pattern, caret, `error: reason`) and the first says only "regex parse error:".
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl PartialEq for MatchRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for MatchRegex {}

impl fmt::Debug for MatchRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix` or `regex`.
/// Values are case-sensitive unless matched with [`StringMatch::matches_ignore_case`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawStringMatch", into = "RawStringMatch")]
pub enum StringMatch {
    /// The whole value equals this string.
    Exact(String),
    /// The value starts with this string.
    Prefix(String),
    /// The regex (RE2 syntax) matches the whole value.
    Regex(MatchRegex),
}

impl StringMatch {
    /// Whether `value` matches (case-sensitive).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => value == e,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(value),
        }
    }

    /// Whether `value` matches, ignoring ASCII case for `exact` and `prefix`.
    /// As in Envoy (and Istio's `ignoreUriCase`), a regex is unaffected: write
    /// `(?i)` in the pattern to make it case-insensitive.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => value.eq_ignore_ascii_case(e),
            Self::Prefix(p) => value
                .as_bytes()
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes())),
            Self::Regex(r) => r.is_match(value),
        }
    }

    /// `"exact"`, `"prefix"` or `"regex"`.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Self::Exact(_) => "exact",
            Self::Prefix(_) => "prefix",
            Self::Regex(_) => "regex",
        }
    }

    /// The string or pattern as written.
    pub fn value(&self) -> &str {
        match self {
            Self::Exact(s) | Self::Prefix(s) => s,
            Self::Regex(r) => r.as_str(),
        }
    }
}

/// The wire form of a `StringMatch`: all three keys optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl RawStringMatch {
    /// `Ok(None)` when no key is set.
    fn into_match(self) -> Result<Option<StringMatch>, String> {
        let set: Vec<&str> = [
            ("exact", self.exact.is_some()),
            ("prefix", self.prefix.is_some()),
            ("regex", self.regex.is_some()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(k, _)| *k)
        .collect();
        if set.len() > 1 {
            return Err(format!(
                "must set only one of exact, prefix or regex, got {}",
                set.join(" and ")
            ));
        }
        Ok(match (self.exact, self.prefix, self.regex) {
            (Some(e), _, _) => Some(StringMatch::Exact(e)),
            (_, Some(p), _) => Some(StringMatch::Prefix(p)),
            (_, _, Some(r)) => Some(StringMatch::Regex(MatchRegex::new(&r)?)),
            _ => None,
        })
    }
}

impl TryFrom<RawStringMatch> for StringMatch {
    type Error = String;
    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        raw.into_match()?
            .ok_or_else(|| "must set one of exact, prefix or regex".to_string())
    }
}

impl From<StringMatch> for RawStringMatch {
    fn from(m: StringMatch) -> Self {
        match m {
            StringMatch::Exact(e) => Self {
                exact: Some(e),
                ..Self::default()
            },
            StringMatch::Prefix(p) => Self {
                prefix: Some(p),
                ..Self::default()
            },
            StringMatch::Regex(r) => Self {
                regex: Some(r.source),
                ..Self::default()
            },
        }
    }
}

/// A header or query-parameter condition. Istio allows an empty match (`{}`)
/// here, meaning "present with any value"; `regex: "*"` means the same (it is
/// not a valid RE2 pattern, and Istio translates it to Envoy's `present_match`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawStringMatch", into = "RawStringMatch")]
pub enum HeaderMatch {
    /// The header (or query parameter) is present, whatever its value.
    Present,
    /// The value matches.
    Match(StringMatch),
}

impl TryFrom<RawStringMatch> for HeaderMatch {
    type Error = String;
    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        if raw.regex.as_deref() == Some("*") && raw.exact.is_none() && raw.prefix.is_none() {
            return Ok(Self::Present);
        }
        Ok(raw.into_match()?.map_or(Self::Present, Self::Match))
    }
}

impl From<HeaderMatch> for RawStringMatch {
    fn from(m: HeaderMatch) -> Self {
        match m {
            HeaderMatch::Present => Self::default(),
            HeaderMatch::Match(m) => m.into(),
        }
    }
}

impl HeaderMatch {
    /// Whether a header (or parameter) with this value, or absent (`None`), matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Self::Present, Some(_)) => true,
            (Self::Match(m), Some(v)) => m.matches(v),
        }
    }
}

// === Destination ===

/// Where traffic goes: a service host, optionally a subset and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service host, e.g. `reviews` or `reviews.prod.svc.cluster.local`.
    pub host: String,
    /// Subset name, defined in the host's DestinationRule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Destination port, needed only when the service exposes several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// A port number (Istio's `PortSelector`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    /// Port number; validation requires 1 to 65535.
    #[serde(default)]
    pub number: u32,
}

impl PortSelector {
    /// The port as `u16`, or `None` if it is out of range (refused by validation).
    pub fn port(self) -> Option<u16> {
        u16::try_from(self.number).ok().filter(|p| *p != 0)
    }
}

// === Headers ===

/// Header manipulation for requests and responses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    /// Applied to the request before forwarding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// Applied to the response before returning it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Set, append and remove operations on one header map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_forms_round_trip() {
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("250ms", Duration::from_millis(250)),
            ("1h30m", Duration::from_secs(5400)),
            ("10us", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
        ] {
            let d = PolicyDuration::parse(text).unwrap();
            assert_eq!(d.get(), want, "{text}");
            let back = PolicyDuration::parse(&d.to_string()).unwrap();
            assert_eq!(back, d, "{text} -> {d}");
        }
        assert_eq!(
            PolicyDuration::from(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(
            PolicyDuration::parse("-1s").unwrap_err(),
            "invalid duration \"-1s\": must not be negative"
        );
        assert!(PolicyDuration::parse("10")
            .unwrap_err()
            .contains("missing unit"));
        assert!(PolicyDuration::parse("1x")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn string_match_semantics() {
        let exact = StringMatch::Exact("/a".into());
        assert!(exact.matches("/a"));
        assert!(!exact.matches("/a/"));
        assert!(!exact.matches("/A"));
        assert!(exact.matches_ignore_case("/A"));

        let prefix = StringMatch::Prefix("/api/".into());
        assert!(prefix.matches("/api/v1"));
        assert!(!prefix.matches("/api"));
        assert!(!prefix.matches("/API/v1"));
        assert!(prefix.matches_ignore_case("/API/v1"));
        assert!(!prefix.matches_ignore_case("/AP"));
        // Multi-byte characters do not panic the byte-wise comparison.
        assert!(!StringMatch::Prefix("é".into()).matches_ignore_case("e"));

        let re = StringMatch::Regex(MatchRegex::new("/v[0-9]+").unwrap());
        assert!(re.matches("/v12"));
        assert!(!re.matches("/v12/x"), "regex must match the whole value");
        assert!(!re.matches("x/v12"));
        assert!(
            !re.matches_ignore_case("/V12"),
            "ignore-case does not apply to regex"
        );
        let alt = MatchRegex::new("a|b").unwrap();
        assert!(alt.is_match("a") && alt.is_match("b") && !alt.is_match("ab"));
        let ci = MatchRegex::new("(?i)abc").unwrap();
        assert!(ci.is_match("ABC"));
    }

    #[test]
    fn bad_regexes_give_one_line_reasons() {
        assert_eq!(
            MatchRegex::new("a(b").unwrap_err(),
            "invalid regex \"a(b\": unclosed group"
        );
        assert_eq!(
            MatchRegex::new("a)|(b").unwrap_err(),
            "invalid regex \"a)|(b\": unopened group"
        );
        assert!(MatchRegex::new(&"a".repeat(1025))
            .unwrap_err()
            .starts_with("regex is too long: 1025 bytes"));
    }

    #[test]
    fn string_match_serde() {
        let m: StringMatch = serde_json::from_str(r#"{"prefix":"/x"}"#).unwrap();
        assert_eq!(m, StringMatch::Prefix("/x".into()));
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"prefix":"/x"}"#);
        let e = serde_json::from_str::<StringMatch>(r#"{"exact":"a","prefix":"b"}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("must set only one of exact, prefix or regex, got exact and prefix"),
            "{e}"
        );
        let e = serde_json::from_str::<StringMatch>("{}").unwrap_err();
        assert!(e.to_string().starts_with("must set one of exact"), "{e}");
        let e = serde_json::from_str::<StringMatch>(r#"{"exct":"a"}"#).unwrap_err();
        assert!(e.to_string().starts_with("unknown field `exct`"), "{e}");

        let h: HeaderMatch = serde_json::from_str("{}").unwrap();
        assert_eq!(h, HeaderMatch::Present);
        let h: HeaderMatch = serde_json::from_str(r#"{"regex":"*"}"#).unwrap();
        assert_eq!(h, HeaderMatch::Present);
        assert_eq!(serde_json::to_string(&h).unwrap(), "{}");
        assert!(HeaderMatch::Present.matches(Some("")));
        assert!(!HeaderMatch::Present.matches(None));
        let empty = HeaderMatch::Match(StringMatch::Exact(String::new()));
        assert!(empty.matches(Some("")));
        assert!(!empty.matches(Some("x")));
        assert!(!empty.matches(None));
    }

    #[test]
    fn percent_fraction() {
        assert_eq!(Percent { value: 50.0 }.fraction(), 0.5);
        assert_eq!(Percent { value: 0.1 }.fraction(), 0.001);
        assert_eq!(Percent { value: 200.0 }.fraction(), 1.0);
        assert_eq!(Percent { value: f64::NAN }.fraction(), 0.0);
    }
}

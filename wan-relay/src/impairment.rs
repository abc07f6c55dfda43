//! What a link does to the bytes it relays: an [`Impairment`], changed at
//! runtime by a [`Change`].
//!
//! The relay works on a TCP byte stream, not on packets, so each impairment
//! is modelled on the chunks the relay reads (up to
//! [`LinkOptions::read_buffer`](crate::LinkOptions::read_buffer) bytes each):
//!
//! - `delay` and `jitter`: a chunk read at `t` is released to the other side
//!   at `t + delay + U(-jitter, +jitter)` (never before `t`), and never before
//!   the chunk read just before it, so jitter never reorders bytes;
//! - `loss`: TCP never loses bytes; a lost segment costs its retransmission.
//!   With probability `loss` a chunk is held back one extra `rto`. One
//!   retransmission per chunk at most (no exponential back-off), and later
//!   bytes wait behind it (head-of-line blocking, as in TCP);
//! - `rate_mbps`: a bandwidth limit per link and direction, shared by the
//!   link's connections; chunks go onto the "wire" one after another at this
//!   rate, then the delay applies (0: no limit). The queue in front of it is
//!   each connection's in-flight bound, like a router's buffer;
//! - `mode`: [`Mode::Pass`], [`Mode::Cut`] or [`Mode::Blackhole`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// Longest delay, jitter or retransmission timeout accepted: one hour.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Highest bandwidth limit accepted, in megabits per second.
pub const MAX_RATE_MBPS: f64 = 1_000_000.0;

/// Lowest non-zero bandwidth limit accepted, in megabits per second (1 kbit/s).
pub const MIN_RATE_MBPS: f64 = 0.001;

/// Retransmission timeout used when none is given: 200 ms, Linux's minimum RTO.
pub const DEFAULT_RTO: Duration = Duration::from_millis(200);

/// The JSON fields of a [`Change`], in the order they are documented.
pub const FIELDS: [&str; 6] = [
    "delay_ms",
    "jitter_ms",
    "loss",
    "rto_ms",
    "rate_mbps",
    "mode",
];

/// Whether a link forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward, with the delay, jitter, loss and rate of the impairment.
    #[default]
    Pass,
    /// A cut with RST: every relayed connection is reset (both ends), and
    /// every new one is accepted and reset at once.
    Cut,
    /// Packets dropped without RST: connections stay open and nothing is
    /// forwarded either way; bytes read are discarded. New connections are
    /// accepted (the kernel completes the handshake) and then ignored.
    ///
    /// Back to [`Mode::Pass`], a connection that lost bytes (or a FIN) in the
    /// blackhole is reset, both ends, since its stream cannot continue; one
    /// that lost nothing (it was idle) resumes, and one accepted during the
    /// blackhole is then connected to the target.
    Blackhole,
}

impl Mode {
    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pass => "pass",
            Mode::Cut => "cut",
            Mode::Blackhole => "blackhole",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = InvalidChange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pass" => Ok(Mode::Pass),
            "cut" => Ok(Mode::Cut),
            "blackhole" => Ok(Mode::Blackhole),
            other => Err(InvalidChange::new(
                "mode",
                format!("unknown mode {other:?} (expected pass, cut or blackhole)"),
            )),
        }
    }
}

/// The impairment of a link. In JSON:
/// `{"delay_ms":30,"jitter_ms":5,"loss":0.01,"rto_ms":200,"rate_mbps":0,"mode":"pass"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Impairment {
    /// One-way delay, applied in each direction.
    #[serde(rename = "delay_ms", with = "millis")]
    pub delay: Duration,
    /// Each chunk's delay is drawn uniformly from `delay ± jitter` (at least 0).
    #[serde(rename = "jitter_ms", with = "millis")]
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a chunk is held back one more [`Impairment::rto`].
    pub loss: f64,
    /// What a lost chunk costs: one retransmission timeout.
    #[serde(rename = "rto_ms", with = "millis")]
    pub rto: Duration,
    /// Bandwidth limit of the link in each direction, shared by its
    /// connections, in megabits (10^6 bits) per second; 0 for none.
    pub rate_mbps: f64,
    /// Forward, cut or blackhole.
    pub mode: Mode,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rto: DEFAULT_RTO,
            rate_mbps: 0.0,
            mode: Mode::Pass,
        }
    }
}

impl Impairment {
    /// Checks every field's range; the error names the first bad field.
    pub fn validate(&self) -> Result<(), InvalidChange> {
        Change::from(*self).validate()
    }

    /// This impairment with `change` applied, if the change is valid.
    pub fn with(&self, change: &Change) -> Result<Impairment, InvalidChange> {
        change.validate()?;
        let mut new = *self;
        if let Some(d) = change.delay {
            new.delay = d;
        }
        if let Some(j) = change.jitter {
            new.jitter = j;
        }
        if let Some(l) = change.loss {
            new.loss = l;
        }
        if let Some(r) = change.rto {
            new.rto = r;
        }
        if let Some(r) = change.rate_mbps {
            new.rate_mbps = r;
        }
        if let Some(m) = change.mode {
            new.mode = m;
        }
        new.validate()?;
        Ok(new)
    }

    /// When a chunk of `len` bytes read at `read_at` is released to the
    /// other side (an empty chunk is a FIN). `last_release` is the
    /// direction's previous release (bytes are never reordered); `wire_free`
    /// is when the link's rate-limited wire in this direction, shared by its
    /// connections, is free again. Both are updated.
    pub(crate) fn release_at(
        &self,
        read_at: Instant,
        len: usize,
        last_release: &mut Option<Instant>,
        wire_free: &mut Option<Instant>,
    ) -> Instant {
        let mut t = read_at;
        if self.rate_mbps > 0.0 && len > 0 {
            let start = wire_free.map_or(read_at, |w| w.max(read_at));
            let secs = len as f64 * 8.0 / (self.rate_mbps * 1e6);
            let on_wire = Duration::try_from_secs_f64(secs)
                .unwrap_or(MAX_DURATION)
                .min(MAX_DURATION);
            t = add(start, on_wire);
            *wire_free = Some(t);
        }
        let mut delay = self.delay.as_secs_f64();
        if !self.jitter.is_zero() {
            delay += (fastrand::f64() * 2.0 - 1.0) * self.jitter.as_secs_f64();
        }
        let delay = Duration::try_from_secs_f64(delay.max(0.0)).unwrap_or(Duration::ZERO);
        t = add(t, delay);
        if self.loss > 0.0 && fastrand::f64() < self.loss {
            t = add(t, self.rto);
        }
        let t = last_release.map_or(t, |last| last.max(t));
        *last_release = Some(t);
        t
    }
}

fn add(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

/// A change to some fields of an [`Impairment`]; `None` leaves a field as
/// it is. In JSON the same fields as [`Impairment`], all optional:
/// `{"delay_ms":30,"mode":"blackhole"}`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Change {
    /// New one-way delay.
    pub delay: Option<Duration>,
    /// New jitter.
    pub jitter: Option<Duration>,
    /// New loss probability, in `[0, 1]`.
    pub loss: Option<f64>,
    /// New retransmission timeout.
    pub rto: Option<Duration>,
    /// New bandwidth limit in Mbit/s (0: none).
    pub rate_mbps: Option<f64>,
    /// New mode.
    pub mode: Option<Mode>,
}

impl From<Impairment> for Change {
    /// A change setting every field to the impairment's.
    fn from(i: Impairment) -> Self {
        Self {
            delay: Some(i.delay),
            jitter: Some(i.jitter),
            loss: Some(i.loss),
            rto: Some(i.rto),
            rate_mbps: Some(i.rate_mbps),
            mode: Some(i.mode),
        }
    }
}

impl Change {
    /// A change of nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the delay.
    #[must_use]
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }

    /// Sets the jitter.
    #[must_use]
    pub fn jitter(mut self, d: Duration) -> Self {
        self.jitter = Some(d);
        self
    }

    /// Sets the loss probability.
    #[must_use]
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = Some(p);
        self
    }

    /// Sets the retransmission timeout.
    #[must_use]
    pub fn rto(mut self, d: Duration) -> Self {
        self.rto = Some(d);
        self
    }

    /// Sets the bandwidth limit in Mbit/s (0: none).
    #[must_use]
    pub fn rate_mbps(mut self, r: f64) -> Self {
        self.rate_mbps = Some(r);
        self
    }

    /// Sets the mode.
    #[must_use]
    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = Some(m);
        self
    }

    /// Whether the change sets no field.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the range of every field set; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidChange> {
        for (field, d) in [
            ("delay_ms", self.delay),
            ("jitter_ms", self.jitter),
            ("rto_ms", self.rto),
        ] {
            if let Some(d) = d {
                if d > MAX_DURATION {
                    return Err(InvalidChange::new(
                        field,
                        format!(
                            "must be at most {} ms, got {}",
                            MAX_DURATION.as_millis(),
                            millis::to_f64(d)
                        ),
                    ));
                }
            }
        }
        if let Some(l) = self.loss {
            if !(0.0..=1.0).contains(&l) {
                return Err(InvalidChange::new(
                    "loss",
                    format!("must be between 0 and 1, got {l}"),
                ));
            }
        }
        if let Some(r) = self.rate_mbps {
            if !(r == 0.0 || (MIN_RATE_MBPS..=MAX_RATE_MBPS).contains(&r)) {
                return Err(InvalidChange::new(
                    "rate_mbps",
                    format!(
                        "must be 0 (no limit) or between {MIN_RATE_MBPS} and {MAX_RATE_MBPS}, got {r}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates a JSON object of impairment fields (see
    /// [`FIELDS`]). Unknown fields, wrong types and out-of-range values are
    /// refused with an error naming the field.
    pub fn from_json(value: &Value) -> Result<Change, InvalidChange> {
        let Value::Object(map) = value else {
            return Err(InvalidChange::new("body", "expected a JSON object"));
        };
        Self::from_json_map(map, &[])
    }

    /// Like [`Change::from_json`] on an object's fields, skipping `extra`
    /// (fields the caller reads itself).
    pub(crate) fn from_json_map(
        map: &Map<String, Value>,
        extra: &[&str],
    ) -> Result<Change, InvalidChange> {
        let mut c = Change::new();
        for (key, v) in map {
            match key.as_str() {
                "delay_ms" => c.delay = Some(json_millis(key, v)?),
                "jitter_ms" => c.jitter = Some(json_millis(key, v)?),
                "rto_ms" => c.rto = Some(json_millis(key, v)?),
                "loss" => c.loss = Some(json_number(key, v)?),
                "rate_mbps" => c.rate_mbps = Some(json_number(key, v)?),
                "mode" => {
                    let Value::String(s) = v else {
                        return Err(InvalidChange::new(
                            "mode",
                            format!("expected a string (pass, cut or blackhole), got {v}"),
                        ));
                    };
                    c.mode = Some(s.parse()?);
                }
                k if extra.contains(&k) => {}
                other => {
                    let mut known: Vec<&str> = FIELDS.to_vec();
                    known.extend_from_slice(extra);
                    return Err(InvalidChange::new(
                        other,
                        format!("unknown field (known: {})", known.join(", ")),
                    ));
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The fields set, as a JSON object (what [`Change::from_json`] reads).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (k, d) in [
            ("delay_ms", self.delay),
            ("jitter_ms", self.jitter),
            ("rto_ms", self.rto),
        ] {
            if let Some(d) = d {
                m.insert(k.to_string(), millis::to_json(d));
            }
        }
        for (k, f) in [("loss", self.loss), ("rate_mbps", self.rate_mbps)] {
            if let Some(f) = f {
                m.insert(k.to_string(), Value::from(f));
            }
        }
        if let Some(mode) = self.mode {
            m.insert("mode".to_string(), Value::from(mode.as_str()));
        }
        m
    }
}

fn json_number(field: &str, v: &Value) -> Result<f64, InvalidChange> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| InvalidChange::new(field, format!("expected a number, got {v}")))
}

fn json_millis(field: &str, v: &Value) -> Result<Duration, InvalidChange> {
    let ms = json_number(field, v)?;
    if ms < 0.0 {
        return Err(InvalidChange::new(
            field,
            format!("must not be negative, got {ms}"),
        ));
    }
    if ms > MAX_DURATION.as_millis() as f64 {
        return Err(InvalidChange::new(
            field,
            format!("must be at most {} ms, got {ms}", MAX_DURATION.as_millis()),
        ));
    }
    Duration::try_from_secs_f64(ms / 1000.0)
        .map_err(|e| InvalidChange::new(field, format!("{e}, got {ms}")))
}

/// Why a change (or an impairment) was refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidChange {
    /// The JSON name of the refused field (`"loss"`, `"delay_ms"`, ...).
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

impl InvalidChange {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Durations as JSON milliseconds: an integer when whole, else a float.
pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;
    use std::time::Duration;

    pub(crate) fn to_f64(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    pub(crate) fn to_json(d: Duration) -> Value {
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            Value::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        } else {
            Value::from(to_f64(d))
        }
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        } else {
            s.serialize_f64(to_f64(*d))
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        if !ms.is_finite() || ms < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "expected a non-negative number of milliseconds, got {ms}"
            )));
        }
        Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let c = Change::from_json(
            &json!({"delay_ms": 30, "jitter_ms": 2.5, "loss": 0.01, "mode": "blackhole"}),
        )
        .unwrap();
        assert_eq!(c.delay, Some(Duration::from_millis(30)));
        assert_eq!(c.jitter, Some(Duration::from_micros(2500)));
        assert_eq!(c.mode, Some(Mode::Blackhole));
        assert_eq!(Change::from_json(&Value::Object(c.to_json())).unwrap(), c);
        let i = Impairment::default().with(&c).unwrap();
        let v = serde_json::to_value(i).unwrap();
        assert_eq!(
            v,
            json!({"delay_ms": 30, "jitter_ms": 2.5, "loss": 0.01, "rto_ms": 200, "rate_mbps": 0.0, "mode": "blackhole"})
        );
        let back: Impairment = serde_json::from_value(v).unwrap();
        assert_eq!(back, i);
    }

    #[test]
    fn refusals_name_the_field() {
        for (body, field) in [
            (json!({"loss": 1.5}), "loss"),
            (json!({"loss": "x"}), "loss"),
            (json!({"delay_ms": -1}), "delay_ms"),
            (json!({"jitter_ms": 4e9}), "jitter_ms"),
            (json!({"rto_ms": null}), "rto_ms"),
            (json!({"rate_mbps": 1e-9}), "rate_mbps"),
            (json!({"mode": "drop"}), "mode"),
            (json!({"mode": 1}), "mode"),
            (json!({"delay": 1}), "delay"),
            (json!([1]), "body"),
        ] {
            let e = Change::from_json(&body).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
        assert!(Change::new().loss(f64::NAN).validate().is_err());
        assert!(Change::new()
            .delay(Duration::from_secs(7200))
            .validate()
            .is_err());
    }

    #[test]
    fn release_order_and_bounds() {
        let i = Impairment::default()
            .with(
                &Change::new()
                    .delay(Duration::from_millis(10))
                    .jitter(Duration::from_millis(20)),
            )
            .unwrap();
        let (mut last, mut wire) = (None, None);
        let t0 = Instant::now();
        let mut prev = t0;
        for k in 0..1000u64 {
            let read = t0 + Duration::from_micros(k * 100);
            let at = i.release_at(read, 10, &mut last, &mut wire);
            assert!(at >= prev);
            assert!(at >= read);
            assert!(at <= read + Duration::from_millis(30) || at == prev);
            prev = at;
        }
        let lossy = Impairment::default()
            .with(&Change::new().loss(1.0).rto(Duration::from_millis(200)))
            .unwrap();
        let (mut last, mut wire) = (None, None);
        assert_eq!(
            lossy.release_at(t0, 10, &mut last, &mut wire),
            t0 + Duration::from_millis(200)
        );
        let limited = Impairment::default()
            .with(&Change::new().rate_mbps(8.0))
            .unwrap();
        let (mut last, mut wire) = (None, None);
        // 1 MB/s: 1000 bytes take 1 ms, and the next 1000 queue behind them.
        assert_eq!(
            limited.release_at(t0, 1000, &mut last, &mut wire),
            t0 + Duration::from_millis(1)
        );
        assert_eq!(
            limited.release_at(t0, 1000, &mut last, &mut wire),
            t0 + Duration::from_millis(2)
        );
    }
}

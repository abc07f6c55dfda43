//! Tables for people, JSON for programs.

use crate::cli::Format;
use crate::Error;
use std::fmt::Write as _;

/// Prints `rows` as JSON, or as a table with `header` and one row of
/// `cells(row)` each.
pub fn emit<T: serde::Serialize>(
    fmt: Format,
    rows: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<(), Error> {
    match fmt {
        Format::Json => {
            let s = serde_json::to_string_pretty(rows).map_err(|e| Error::Other(e.into()))?;
            println!("{s}");
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = rows.iter().map(cells).collect();
            print!("{}", table(header, &rows));
        }
    }
    Ok(())
}

/// Renders rows under a header as aligned columns separated by three spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Formats Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-22T01:02:03Z`
/// (whole seconds; the number itself when out of range).
pub fn rfc3339(unix_ms: i64) -> String {
    jiff::Timestamp::from_second(unix_ms.div_euclid(1000))
        .map_or_else(|_| unix_ms.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_309_323_000), "2026-11-22T01:02:03Z");
    }

    #[test]
    fn aligned() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A      BB\nlong   x\n");
    }
}

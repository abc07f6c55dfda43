//! Splitting a multi-document YAML file, and turning each document into JSON
//! so YAML and stored JSON go through the same decoder.

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// Most documents in one file: `meshctl validate`/`apply` reads whole
/// files, and a Kubernetes apply of more is unusual.
pub(crate) const MAX_DOCUMENTS: usize = 10_000;
/// Deepest nesting of flow collections (`[`, `{`) in a document; policy
/// documents nest a handful of levels.
pub(crate) const MAX_FLOW_DEPTH: usize = 64;

/// One document of a stream.
pub(crate) struct Chunk {
    /// 1-based position in the stream.
    pub(crate) number: usize,
    /// The line of the file the document's text starts on (1-based).
    pub(crate) first_line: usize,
    /// The document's text.
    pub(crate) text: String,
}

impl Chunk {
    /// Refuses a document nested deeper than [`MAX_FLOW_DEPTH`] flow
    /// collections before the parser sees it (a cheap scan that skips
    /// quoted scalars and comments).
    pub(crate) fn check_depth(&self) -> Result<(), String> {
        let (mut depth, mut quote, mut comment) = (0usize, None, false);
        let mut prev = ' ';
        for c in self.text.chars() {
            match (quote, c) {
                _ if comment => comment = c != '\n',
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => comment = true,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(format!(
                            "flow collections nested deeper than {MAX_FLOW_DEPTH} levels"
                        ));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        Ok(())
    }

    /// A parser error with its lines counted in the whole file (the
    /// parser's message may name two: the problem's and its context's).
    pub(crate) fn locate(&self, e: &serde_yaml_ng::Error) -> String {
        const AT: &str = "at line ";
        let text = e.to_string();
        let add = self.first_line - 1;
        let mut out = String::with_capacity(text.len() + 8);
        let mut rest = text.as_str();
        while let Some(i) = rest.find(AT) {
            let (head, tail) = rest.split_at(i + AT.len());
            out.push_str(head);
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            match tail[..digits].parse::<usize>() {
                Ok(n) => out.push_str(&(n + add).to_string()),
                Err(_) => out.push_str(&tail[..digits]),
            }
            rest = &tail[digits..];
        }
        out.push_str(rest);
        out
    }
}

/// `---` at the start of a line, alone or followed by blanks or content.
fn is_document_start(line: &str) -> bool {
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t.starts_with('%')
    })
}

/// Splits on `---` lines. We split ourselves rather than iterate the YAML
/// parser's documents because after a syntax error the parser cannot resume,
/// and a file should report the errors of every document. YAML forbids `---`
/// at the start of a line inside any scalar, so the split is exact.
///
/// Text before the first `---` is a document only if it has content; each
/// `---` starts a document, possibly empty (the caller skips those).
pub(crate) fn split(text: &str) -> Vec<Chunk> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut start_line = 1;
    let mut explicit = false;
    let flush = |body: &str, start: usize, explicit: bool, chunks: &mut Vec<Chunk>| {
        if explicit || !is_blank(body) {
            chunks.push(Chunk {
                number: chunks.len() + 1,
                first_line: start,
                text: body.to_string(),
            });
        }
    };
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_document_start(line.trim_end_matches(['\n', '\r'])) {
            flush(&current, start_line, explicit, &mut chunks);
            current.clear();
            start_line = i + 1;
            explicit = true;
        }
        current.push_str(line);
    }
    flush(&current, start_line, explicit, &mut chunks);
    chunks
}

/// Converts a parsed YAML document to JSON. Non-string scalar keys become
/// strings, as Kubernetes' YAML reader does; tags, complex keys and
/// non-finite numbers have no JSON form and are refused with their path.
pub(crate) fn to_json(v: Yaml, path: &str) -> Result<Json, (String, String)> {
    Ok(match v {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Json::Number)
                    .ok_or_else(|| (path.to_string(), format!("{n} is not a finite number")))?
            }
        }
        Yaml::String(s) => Json::String(s),
        Yaml::Sequence(seq) => Json::Array(
            seq.into_iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let key = match k {
                    Yaml::String(s) => s,
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    other => {
                        return Err((
                            path.to_string(),
                            format!("mapping keys must be strings, got {}", kind_of(&other)),
                        ))
                    }
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let v = to_json(v, &child)?;
                out.insert(key, v);
            }
            Json::Object(out)
        }
        Yaml::Tagged(t) => {
            return Err((
                path.to_string(),
                format!("YAML tags are not supported, got {}", t.tag),
            ))
        }
    })
}

fn kind_of(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "null",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a sequence",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Yaml {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn splits_and_numbers() {
        let chunks = split("a: 1\n---\nb: 2\n---\n---\nc: 3\n");
        let numbers: Vec<usize> = chunks.iter().map(|c| c.number).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
        assert_eq!(parse(&chunks[2].text), Yaml::Null);
        // Each knows the line it starts on, with no padding.
        assert_eq!(chunks[3].first_line, 5);
        assert!(chunks[3].text.starts_with("---"));

        // Leading comments or a leading `---` do not add a document.
        let chunks = split("# header\n\n---\na: 1\n");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].number, 1);
        assert!(split("").is_empty());
        assert!(split("# only a comment\n").is_empty());

        // `--- {a: 1}` carries content; `---x` is not a marker.
        let chunks = split("--- {a: 1}\n---x: 2\n");
        assert_eq!(chunks.len(), 1);
        // CRLF line endings and a byte-order mark.
        let chunks = split("\u{feff}a: 1\r\n---\r\nb: 2\r\n");
        assert_eq!(chunks.len(), 2);
        assert_eq!(parse(&chunks[1].text)["b"], Yaml::from(2));
    }

    #[test]
    fn converts_to_json() {
        let j = to_json(parse("a: [1, -2, 2.5, true, null, x]\n1: one\n"), "").unwrap();
        assert_eq!(
            j,
            serde_json::json!({"a": [1, -2, 2.5, true, null, "x"], "1": "one"})
        );
        let e = to_json(parse("a:\n  b: !foo 1\n"), "").unwrap_err();
        assert_eq!(
            e,
            ("a.b".into(), "YAML tags are not supported, got !foo".into())
        );
        let e = to_json(parse("a:\n- .nan\n"), "").unwrap_err();
        assert_eq!(e.0, "a[0]");
        let e = to_json(parse("? [1]\n: 2\n"), "").unwrap_err();
        assert_eq!(e.1, "mapping keys must be strings, got a sequence");
    }
}

//! `validate`, `apply`, `get`, `delete`: Istio-shaped policy documents.
//!
//! Files are parsed and validated here first, so errors carry YAML line
//! numbers and nothing reaches the federation from a bad file; the
//! federation validates again before its one-transaction write.

use crate::cli::Format;
use crate::output::emit;
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_core::name::Namespace;
use mesh_core::policy::{parse_yaml, Document, PolicyWarning};
use serde::Serialize;
use std::io::Read as _;
use std::path::PathBuf;

/// Files of policy documents.
#[derive(Debug, Clone, clap::Args)]
pub struct FileArgs {
    /// YAML file (several documents separated by `---`); `-` reads stdin.
    /// Repeat for several files: they are taken together, all or nothing.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace of documents that do not name one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

/// One document as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct DocRow {
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `valid`, `created`, `configured`, `unchanged`, `deleted`, or the revision for `get`.
    pub result: String,
}

/// Reads and validates every file: the documents, or every error of every file.
fn load(args: &FileArgs) -> Result<(Vec<Document>, Vec<PolicyWarning>, String), Error> {
    let ns = Namespace::new(&args.namespace)
        .map_err(|e| Error::Usage(format!("invalid --namespace: {e}")))?;
    let mut docs = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let mut names = Vec::new();
    for f in &args.files {
        let (name, text) = read(f)?;
        match parse_yaml(&name, &text, &ns) {
            Ok(p) => {
                docs.extend(p.documents);
                warnings.extend(p.warnings);
            }
            Err(errs) => errors.extend(errs.iter().map(ToString::to_string)),
        }
        names.push(name);
    }
    if docs.is_empty() && errors.is_empty() {
        errors.push(format!("{}: no documents", names.join(", ")));
    }
    // Several files are one set: the same resource twice is refused as
    // within one file.
    let mut seen = std::collections::BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        let (kind, ns, name) = d.key();
        if let Some(first) = seen.insert((kind, ns.clone(), name.to_string()), i) {
            errors.push(format!(
                "duplicate {} {ns}/{name}: given twice (documents {} and {} of the files taken together)",
                kind.as_str(),
                first + 1,
                i + 1
            ));
        }
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    Ok((docs, warnings, names.join(",")))
}

fn read(f: &PathBuf) -> Result<(String, String), Error> {
    if f.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::Usage(format!("cannot read stdin: {e}")))?;
        return Ok(("<stdin>".into(), s));
    }
    let name = f.display().to_string();
    let text =
        std::fs::read_to_string(f).map_err(|e| Error::Usage(format!("cannot read {name}: {e}")))?;
    Ok((name, text))
}

fn warn_all(warnings: &[PolicyWarning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn row(doc: &Document, result: &str) -> DocRow {
    let (kind, ns, name) = doc.key();
    DocRow {
        kind: kind.as_str().to_string(),
        namespace: ns.to_string(),
        name: name.to_string(),
        result: result.to_string(),
    }
}

const HEADER: [&str; 4] = ["KIND", "NAMESPACE", "NAME", "RESULT"];

fn cells(r: &DocRow) -> Vec<String> {
    vec![
        r.kind.clone(),
        r.namespace.clone(),
        r.name.clone(),
        r.result.clone(),
    ]
}

/// `meshctl validate -f FILE`: local, needs no federation.
pub fn validate(args: &FileArgs, fmt: Format) -> Result<(), Error> {
    let (docs, warnings, _) = load(args)?;
    warn_all(&warnings);
    let rows: Vec<DocRow> = docs.iter().map(|d| row(d, "valid")).collect();
    emit(fmt, &rows, &HEADER, cells)
}

pub(crate) fn to_api(doc: &Document) -> api::PolicyDocument {
    let (kind, ns, name) = doc.key();
    api::PolicyDocument {
        r#ref: Some(api::PolicyRef {
            kind: kind.as_str().to_string(),
            namespace: ns.to_string(),
            name: name.to_string(),
        }),
        json: doc.to_json().to_string(),
        revision: 0,
    }
}

/// `meshctl apply -f FILE [--dry-run]`.
pub async fn apply(
    url: &crate::client::Fed,
    args: &FileArgs,
    dry_run: bool,
    fmt: Format,
) -> Result<(), Error> {
    let (docs, warnings, source) = load(args)?;
    warn_all(&warnings);
    let ch = crate::client::connect(url).await?;
    let resp = AdminClient::new(ch)
        .apply_policies(api::ApplyPoliciesRequest {
            source,
            documents: docs.iter().map(to_api).collect(),
            dry_run,
        })
        .await?
        .into_inner();
    let suffix = if dry_run { " (dry run)" } else { "" };
    let rows: Vec<DocRow> = resp
        .changes
        .into_iter()
        .map(|c| {
            let r = c.r#ref.unwrap_or_default();
            DocRow {
                kind: r.kind,
                namespace: r.namespace,
                name: r.name,
                result: format!("{}{suffix}", c.action),
            }
        })
        .collect();
    emit(fmt, &rows, &HEADER, cells)
}

/// `meshctl delete -f FILE`.
pub async fn delete(url: &crate::client::Fed, args: &FileArgs, fmt: Format) -> Result<(), Error> {
    let (docs, _, _) = load(args)?;
    let ch = crate::client::connect(url).await?;
    AdminClient::new(ch)
        .delete_policies(api::DeletePoliciesRequest {
            refs: docs.iter().filter_map(|d| to_api(d).r#ref).collect(),
        })
        .await?;
    let rows: Vec<DocRow> = docs.iter().map(|d| row(d, "deleted")).collect();
    emit(fmt, &rows, &HEADER, cells)
}

/// `meshctl get [KIND [NAME]] [-n NS]`: a table, or the documents as JSON.
/// The arguments are checked before the federation is dialled.
pub async fn get(
    url: &crate::client::Fed,
    fmt: Format,
    kind: Option<&str>,
    name: Option<&str>,
    namespace: Option<&str>,
) -> Result<(), Error> {
    if name.is_some() && kind.is_none() {
        return Err(Error::Usage("a NAME needs a KIND before it".into()));
    }
    let kind = match kind {
        Some(k) => k
            .parse::<mesh_core::policy::Kind>()
            .map_err(|e| Error::Usage(format!("invalid KIND: {e}")))?
            .as_str()
            .to_string(),
        None => String::new(),
    };
    let ch = crate::client::connect(url).await?;
    let resp = AdminClient::new(ch)
        .list_policies(api::ListPoliciesRequest {
            kind,
            namespace: namespace.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    let docs: Vec<api::PolicyDocument> = resp
        .documents
        .into_iter()
        .filter(|d| name.is_none_or(|n| d.r#ref.as_ref().is_some_and(|r| r.name == n)))
        .collect();
    if let Some(n) = name {
        if docs.is_empty() {
            return Err(Error::Status(format!("{n}: not found")));
        }
    }
    match fmt {
        Format::Json => {
            let values: Vec<serde_json::Value> = docs
                .iter()
                .filter_map(|d| serde_json::from_str(&d.json).ok())
                .collect();
            let s = serde_json::to_string_pretty(&values).map_err(|e| Error::Other(e.into()))?;
            println!("{s}");
            Ok(())
        }
        Format::Table => {
            let rows: Vec<DocRow> = docs
                .iter()
                .map(|d| {
                    let r = d.r#ref.clone().unwrap_or_default();
                    DocRow {
                        kind: r.kind,
                        namespace: r.namespace,
                        name: r.name,
                        result: d.revision.to_string(),
                    }
                })
                .collect();
            emit(
                fmt,
                &rows,
                &["KIND", "NAMESPACE", "NAME", "REVISION"],
                cells,
            )
        }
    }
}

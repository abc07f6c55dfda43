//! `meshctl`'s configuration file: contexts, each a federation URL, the CA
//! bundle it is checked against, and the operator's credential, as a
//! kubeconfig holds them.
//!
//! Where it is: `$FEDMESH_CONFIG`, else `$XDG_CONFIG_HOME/fedmesh/config.yaml`,
//! else `~/.config/fedmesh/config.yaml`. It holds a private key, so it is
//! written with mode 0600.
//!
//! ```yaml
//! current-context: demo
//! contexts:
//! - name: demo
//!   server: https://127.0.0.1:15010
//!   certificate-authority-data: |
//!     -----BEGIN CERTIFICATE-----
//!     ...
//!   client-certificate-data: |
//!     ...
//!   client-key-data: |
//!     ...
//! ```

use std::path::{Path, PathBuf};

/// Largest configuration file read (it holds a few PEM blocks).
const MAX_FILE: u64 = 1024 * 1024;

/// One federation and how to call it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    /// The context's name.
    pub name: String,
    /// `https://host:port` (or `http://` for a federation run with
    /// `--insecure-plaintext`).
    pub server: String,
    /// The roots the federation's certificate must chain to, PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_authority_data: String,
    /// The operator's certificate chain, PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_certificate_data: String,
    /// Its private key, PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_key_data: String,
}

/// The file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientConfig {
    /// The context used when none is named.
    #[serde(default)]
    pub current_context: String,
    /// Every context.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

impl ClientConfig {
    /// Where the configuration is, from the environment.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("FEDMESH_CONFIG").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(x).join("fedmesh/config.yaml"));
        }
        std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .map(|h| PathBuf::from(h).join(".config/fedmesh/config.yaml"))
    }

    /// Reads `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, String> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if meta.len() > MAX_FILE {
            return Err(format!(
                "{}: {} bytes; a configuration is at most {MAX_FILE}",
                path.display(),
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            format!("{}: {at}: {}", path.display(), e.into_inner())
        })
    }

    /// Writes `path` (mode 0600, through a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_yaml_ng::to_string(self).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let tmp = path.with_extension("yaml.tmp");
        write_private(&tmp, text.as_bytes()).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The context named `name`, else the current one.
    pub fn context(&self, name: Option<&str>) -> Option<&Context> {
        let want = name.unwrap_or(&self.current_context);
        self.contexts.iter().find(|c| c.name == want)
    }

    /// Adds or replaces `ctx`, and makes it current.
    pub fn upsert(&mut self, ctx: Context) {
        self.current_context.clone_from(&ctx.name);
        match self.contexts.iter_mut().find(|c| c.name == ctx.name) {
            Some(c) => *c = ctx,
            None => self.contexts.push(ctx),
        }
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_upserts() {
        let dir = std::env::temp_dir().join(format!("fedmesh-cc-{}", std::process::id()));
        let path = dir.join("config.yaml");
        let mut c = ClientConfig::default();
        c.upsert(Context {
            name: "a".into(),
            server: "https://127.0.0.1:1".into(),
            ..Default::default()
        });
        c.upsert(Context {
            name: "b".into(),
            server: "https://127.0.0.1:2".into(),
            ..Default::default()
        });
        c.upsert(Context {
            name: "a".into(),
            server: "https://127.0.0.1:3".into(),
            ..Default::default()
        });
        c.save(&path).unwrap();
        let back = ClientConfig::load(&path).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.current_context, "a");
        assert_eq!(back.context(None).unwrap().server, "https://127.0.0.1:3");
        assert_eq!(back.contexts.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "contexts:\n- name: x\n  sever: y\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err();
        assert!(e.contains("sever"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `nllb kubeconfig`: a copy of a component kubeconfig (kubelet, kube-proxy)
//! whose server is a service's virtual address.
//!
//! Only the cluster used by the current context is rewritten (a kubeconfig
//! may name other clusters the component never uses; they are left alone).
//! The file is read and written with kube-rs's `Kubeconfig`, which keeps
//! fields it does not model (its `other` maps), so they survive; comments
//! do not (YAML libraries drop them), and keys come out in kube-rs's order. The copy is written atomically with the input's permissions.
//! Relative file paths (CA, client certificate and key, token file) are
//! relative to the kubeconfig's own directory: when the copy goes to another
//! directory they are made absolute, so they keep naming the same files.

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use kube::config::Kubeconfig;

use crate::{config::Config, errors::ConfigError};

/// Default `--config` of `nllb kubeconfig`.
pub const DEFAULT_CONFIG: &str = "/etc/nllb/config.yaml";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("kubeconfig {path} is not a kubeconfig: {source}")]
    Parse { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("kubeconfig {path}: {why}")]
    Shape { path: PathBuf, why: String },
    #[error("cannot write {path}: {source} (is the directory writable?)")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `nllb kubeconfig`: mount with `#[command(flatten)]` or as a subcommand's args.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeconfigArgs {
    /// The component kubeconfig to copy (e.g. /var/lib/k0s/kubelet.conf).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write the rewritten copy (may be the same file as --in).
    #[arg(long = "out", value_name = "FILE")]
    pub output: PathBuf,
    /// The nllb service whose virtual address becomes the server.
    #[arg(long, default_value = "apiserver")]
    pub service: String,
    /// The agent config that defines the service.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// A k0s cluster config the agent derives its services from.
    #[arg(long, value_name = "FILE")]
    pub k0s_config: Option<PathBuf>,
}

/// Runs the command: prints the original server on stdout (so a script can
/// seed `backends` with it) and returns it.
pub fn run(args: &KubeconfigArgs) -> Result<String, KubeconfigError> {
    let config = Config::load_with(&args.config, args.k0s_config.as_deref())?;
    let server = service_server(&config, &args.service)?;
    let original = rewrite_kubeconfig(&args.input, &args.output, &server)?;
    println!("{original}");
    Ok(original)
}

/// `https://VIP` for a service: its first IPv4 virtual address, else its first.
pub fn service_server(config: &Config, service: &str) -> Result<String, ConfigError> {
    let svc = config.services.iter().find(|s| s.name == service).ok_or_else(|| {
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        ConfigError::new("--service", format!("no service {service:?} in the config; it has {names:?}"))
    })?;
    let addr: SocketAddr = svc
        .listen
        .iter()
        .find(|a| a.is_ipv4())
        .or(svc.listen.first())
        .copied()
        .ok_or_else(|| ConfigError::new("--service", format!("service {service:?} has no virtual address")))?;
    Ok(format!("https://{addr}"))
}

/// Writes `input` to `output` with the current context's cluster server set
/// to `server`; returns the server it had.
pub fn rewrite_kubeconfig(input: &Path, output: &Path, server: &str) -> Result<String, KubeconfigError> {
    let text = std::fs::read_to_string(input).map_err(|source| KubeconfigError::Read { path: input.into(), source })?;
    let mut doc =
        Kubeconfig::from_yaml(&text).map_err(|source| KubeconfigError::Parse { path: input.into(), source })?;
    let original =
        set_current_server(&mut doc, server).map_err(|why| KubeconfigError::Shape { path: input.into(), why })?;
    let in_dir = absolute_dir(input);
    if in_dir != absolute_dir(output) {
        anchor_relative_paths(&mut doc, &in_dir);
    }
    let body = crate::yaml::to_string(&doc);
    let meta = std::fs::metadata(input).map_err(|source| KubeconfigError::Read { path: input.into(), source })?;
    write_atomically(output, body.as_bytes(), &meta)
        .map_err(|source| KubeconfigError::Write { path: output.into(), source })?;
    Ok(original)
}

/// Sets the server of the cluster the current context uses (or of the only
/// cluster, when there is no current context); returns the old one.
pub fn set_current_server(doc: &mut Kubeconfig, server: &str) -> Result<String, String> {
    let current = doc.current_context.as_deref().filter(|s| !s.is_empty());
    let cluster_name = match current {
        Some(ctx) => doc
            .contexts
            .iter()
            .find(|c| c.name == ctx)
            .ok_or_else(|| format!("current-context {ctx:?} is not in `contexts`"))?
            .context
            .as_ref()
            .map(|c| c.cluster.clone())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("context {ctx:?} names no cluster"))?,
        None => match doc.clusters.as_slice() {
            [only] => only.name.clone(),
            _ => {
                return Err("has no current-context and not exactly one cluster; set current-context".into());
            }
        },
    };
    let cluster = doc
        .clusters
        .iter_mut()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_mut())
        .ok_or_else(|| format!("cluster {cluster_name:?} is not in `clusters`"))?;
    let original = cluster.server.replace(server.to_string());
    original.ok_or_else(|| format!("cluster {cluster_name:?} has no server"))
}

fn absolute_dir(file: &Path) -> PathBuf {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Makes the file paths a kubeconfig may hold absolute, relative to `dir`.
pub fn anchor_relative_paths(doc: &mut Kubeconfig, dir: &Path) {
    let anchor = |p: &mut Option<String>| {
        if let Some(path) = p
            && !path.is_empty()
            && Path::new(path.as_str()).is_relative()
        {
            *path = dir.join(path.as_str()).to_string_lossy().into_owned();
        }
    };
    for c in doc.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        anchor(&mut c.certificate_authority);
    }
    for u in doc.auth_infos.iter_mut().filter_map(|u| u.auth_info.as_mut()) {
        anchor(&mut u.client_certificate);
        anchor(&mut u.client_key);
        anchor(&mut u.token_file);
    }
}

/// Temp file in the target's directory, same mode (and owner when we may)
/// as `like`, fsync, rename, fsync the directory.
fn write_atomically(path: &Path, body: &[u8], like: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("output has no file name"))?;
    let tmp = dir.join(format!(".{}.nllb-{}.tmp", name.to_string_lossy(), std::process::id()));
    let mode = like.permissions().mode() & 0o7777;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        // Owner first, then mode: a kubeconfig holds keys, never widen early.
        let _ = std::os::unix::fs::fchown(&f, Some(like.uid()), Some(like.gid()));
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET: &str = r#"apiVersion: v1
kind: Config
clusters:
- cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: QUJD
    x-unknown-field: kept
  name: other
- cluster:
    server: https://198.18.1.2:6443
    certificate-authority: /var/lib/k0s/pki/ca.crt
  name: local
contexts:
- context:
    cluster: local
    user: user
  name: Default
current-context: Default
users:
- name: user
  user:
    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem
    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem
preferences: {}
"#;

    fn parse(text: &str) -> Kubeconfig {
        Kubeconfig::from_yaml(text).unwrap()
    }

    fn as_json(doc: &Kubeconfig) -> serde_json::Value {
        serde_json::to_value(doc).unwrap()
    }

    #[test]
    fn rewrites_only_the_current_cluster_and_keeps_the_rest() {
        let mut doc = parse(KUBELET);
        let before = as_json(&doc);
        let orig = set_current_server(&mut doc, "https://127.0.0.1:7443").unwrap();
        assert_eq!(orig, "https://198.18.1.2:6443");
        let after = as_json(&doc);
        assert_eq!(after["clusters"][1]["cluster"]["server"], "https://127.0.0.1:7443");
        assert_eq!(after["clusters"][0], before["clusters"][0]);
        assert_eq!(after["clusters"][0]["cluster"]["x-unknown-field"], "kept");
        assert_eq!(after["users"], before["users"]);
        assert_eq!(
            after["clusters"][1]["cluster"]["certificate-authority"],
            before["clusters"][1]["cluster"]["certificate-authority"]
        );
        // What is written reads back the same.
        assert_eq!(as_json(&parse(&crate::yaml::to_string(&doc))), after);
    }

    #[test]
    fn relative_paths_are_anchored_to_the_input_directory() {
        let mut doc = parse(&KUBELET.replace("/var/lib/k0s/pki/ca.crt", "pki/ca.crt"));
        anchor_relative_paths(&mut doc, Path::new("/var/lib/k0s"));
        let v = as_json(&doc);
        assert_eq!(v["clusters"][1]["cluster"]["certificate-authority"], "/var/lib/k0s/pki/ca.crt");
        // Absolute paths are left alone.
        assert_eq!(v["users"][0]["user"]["client-key"], "/var/lib/kubelet/pki/kubelet-client-current.pem");
    }

    #[test]
    fn missing_context_is_an_error() {
        let mut doc = parse(&KUBELET.replace("current-context: Default", "current-context: nope"));
        let e = set_current_server(&mut doc, "https://127.0.0.1:7443").unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
    }
}

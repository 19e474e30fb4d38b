//! TLS client settings for `probe: https`, built once from `health:`.

use std::{fs, net::IpAddr, path::Path, sync::Arc};

use base64::Engine;
use kube::config::Kubeconfig;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use super::{HealthConfig, HealthError};

/// The rustls config and the name every controller's certificate must carry
/// (`None`: the controller's own IP, the usual SAN of an API server cert).
pub struct TlsSettings {
    pub config: Arc<ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
}

impl TlsSettings {
    pub fn from_config(cfg: &HealthConfig) -> Result<Self, HealthError> {
        // Explicit provider: other crates in the binary may enable a second
        // rustls backend, and then the process-wide default is ambiguous.
        let provider = Arc::new(ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| HealthError::Tls(format!("no usable TLS versions: {e}")))?;
        let builder = if cfg.insecure_skip_verify {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        } else {
            builder.with_root_certificates(roots(cfg)?)
        };
        let config = match (&cfg.client_cert_file, &cfg.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "health.clientCertFile")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| HealthError::file("health.clientKeyFile", key, format!("no PEM private key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| HealthError::Tls(format!("client certificate and key do not fit together: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        let server_name = match &cfg.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                HealthError::Config(crate::errors::ConfigError::new(
                    "health.serverName",
                    format!("{name:?} is neither a DNS name nor an IP address"),
                ))
            })?),
            None => None,
        };
        Ok(TlsSettings { config: Arc::new(config), server_name })
    }

    /// The name to send (SNI) and verify for one controller.
    pub fn name_for(&self, ip: IpAddr) -> ServerName<'static> {
        self.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()))
    }
}

fn roots(cfg: &HealthConfig) -> Result<RootCertStore, HealthError> {
    let (certs, field, source) = if let Some(ca) = &cfg.ca_file {
        (read_certs(ca, "health.caFile")?, "health.caFile", ca.clone())
    } else if let Some(kc) = &cfg.kubeconfig {
        (kubeconfig_ca(kc)?, "health.kubeconfig", kc.clone())
    } else {
        return Err(HealthError::Config(crate::errors::ConfigError::new(
            "health.caFile",
            "probe: https needs the CA that signs the API servers' certificates: set caFile, \
             or kubeconfig, or insecureSkipVerify: true",
        )));
    };
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(HealthError::file(field, &source, "holds no usable CA certificate".into()));
    }
    Ok(store)
}

fn read_certs(path: &Path, field: &'static str) -> Result<Vec<CertificateDer<'static>>, HealthError> {
    let pem = fs::read(path).map_err(|e| HealthError::file(field, path, e.to_string()))?;
    parse_certs(&pem).map_err(|m| HealthError::file(field, path, m))
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// The CA of the kubeconfig's current context's cluster (or of its first
/// cluster): kubelet's kubeconfig on a worker already carries it, so
/// `probe: https` needs no extra file there. kube-rs reads the file (and
/// resolves a relative `certificate-authority` against the kubeconfig's
/// directory, as kubectl does).
fn kubeconfig_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, HealthError> {
    const FIELD: &str = "health.kubeconfig";
    let kc = Kubeconfig::read_from(path).map_err(|e| {
        HealthError::file(FIELD, path, format!("not a usable kubeconfig: {}", crate::errors::chain(&e)))
    })?;
    let wanted = kc
        .current_context
        .as_ref()
        .and_then(|cur| kc.contexts.iter().find(|c| &c.name == cur))
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let named = match &wanted {
        Some(name) => kc.clusters.iter().find(|c| &c.name == name),
        None => kc.clusters.first(),
    }
    .ok_or_else(|| HealthError::file(FIELD, path, "has no cluster for its current-context".into()))?;
    let cluster = named.cluster.clone().unwrap_or_default();
    if let Some(data) = &cluster.certificate_authority_data {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| HealthError::file(FIELD, path, format!("certificate-authority-data is not base64: {e}")))?;
        return parse_certs(&pem)
            .map_err(|m| HealthError::file(FIELD, path, format!("certificate-authority-data {m}")));
    }
    if let Some(ca) = &cluster.certificate_authority {
        return read_certs(Path::new(ca), FIELD);
    }
    Err(HealthError::file(
        FIELD,
        path,
        format!(
            "cluster {:?} has neither certificate-authority-data nor certificate-authority; set health.caFile",
            named.name
        ),
    ))
}

/// `insecureSkipVerify: true`: any certificate is accepted, but handshake
/// signatures are still checked so the probe speaks real TLS.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

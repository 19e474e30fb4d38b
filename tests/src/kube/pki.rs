//! The control plane's PKI, made at test time: one CA, the API servers'
//! serving certificate, client certificates, and the ServiceAccount
//! signing key pair. Written as PEM files for kube-apiserver and kubectl.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The names every API server certificate carries besides its IPs: what
/// in-cluster clients (and the DaemonSet's kubeconfig) verify.
pub const SERVICE_NAMES: [&str; 5] = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// A client certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
pub struct KubePki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// `system:masters`: what the test uses to drive the cluster.
    pub admin: ClientCert,
    pub sa_private_key: PathBuf,
    pub sa_public_key: PathBuf,
    ca: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl KubePki {
    /// Writes everything into `dir`. `ips` go into the serving certificate
    /// next to 127.0.0.1, ::1 and [`SERVICE_NAMES`].
    pub fn new(dir: &Path, ips: &[IpAddr]) -> KubePki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "nllb-test-kubernetes-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        let ca_cert_path = write(dir, "ca.crt", &ca_cert.pem());
        let ca = Issuer::new(ca, ca_key);

        let mut sans: Vec<String> = vec!["127.0.0.1".into(), "::1".into()];
        sans.extend(ips.iter().map(IpAddr::to_string));
        sans.extend(SERVICE_NAMES.iter().map(|s| s.to_string()));
        let key = KeyPair::generate().expect("generate serving key");
        let mut params = CertificateParams::new(sans).expect("serving cert params");
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca).expect("sign serving cert");
        let serving_cert = write(dir, "apiserver.crt", &cert.pem());
        let serving_key = write(dir, "apiserver.key", &key.serialize_pem());

        let sa = KeyPair::generate().expect("generate ServiceAccount key");
        let sa_private_key = write(dir, "sa.key", &sa.serialize_pem());
        let sa_public_key = write(dir, "sa.pub", &sa.public_key_pem());

        let mut pki = KubePki {
            ca_cert: ca_cert_path,
            serving_cert,
            serving_key,
            admin: ClientCert {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            sa_private_key,
            sa_public_key,
            ca,
            dir: dir.to_path_buf(),
        };
        pki.admin = pki.client("nllb-test-admin", &["system:masters"]);
        pki
    }

    /// A client certificate for user `name` in `groups`, signed by the CA
    /// the API servers trust (`--client-ca-file`).
    pub fn client(&self, name: &str, groups: &[&str]) -> ClientCert {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client cert params");
        params.distinguished_name.push(DnType::CommonName, name);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca).expect("sign client cert");
        let file = name.replace(':', "_");
        ClientCert {
            cert: write(&self.dir, &format!("{file}.crt"), &cert.pem()),
            key: write(&self.dir, &format!("{file}.key"), &key.serialize_pem()),
        }
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

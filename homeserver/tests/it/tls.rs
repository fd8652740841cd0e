//! A throwaway certificate authority for tests of outbound HTTPS: a CA, a certificate for
//! 127.0.0.1 (and `*.hearth.test`) that it signed, and the CA as a PEM file for Hearth's `extra_ca_file` settings.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub(crate) struct TestCa {
    dir: PathBuf,
    server: rustls::ServerConfig,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        homeserver::install_crypto_provider();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "Hearth test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().unwrap();
        // Also for names under `hearth.test`, which tests of server discovery serve from their
        // own DNS server.
        let names = vec!["127.0.0.1".to_owned(), "*.hearth.test".to_owned()];
        let leaf = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();

        let dir =
            std::env::temp_dir().join(format!("hearth-ca-{}", homeserver::auth::tokens::random_token(12)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Self { dir, server }
    }

    /// The CA's certificate, PEM.
    pub(crate) fn ca_file(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// The certificate the CA signed for 127.0.0.1 and its private key, PEM files (Hearth's
    /// `tls.certificate` and `tls.private_key`).
    pub(crate) fn server_files(&self) -> (String, String) {
        let path = |name: &str| self.dir.join(name).display().to_string();
        (path("server.pem"), path("server.key"))
    }

    /// An HTTP client that trusts the CA.
    pub(crate) fn client(&self) -> reqwest::Client {
        homeserver::outbound::trust_extra_ca(reqwest::Client::builder(), Some(&self.ca_file()))
            .unwrap()
            .build()
            .unwrap()
    }

    /// TLS for a server on 127.0.0.1 with the certificate the CA signed.
    pub(crate) fn server_config(&self) -> rustls::ServerConfig {
        self.server.clone()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

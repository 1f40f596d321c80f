//! A throwaway PKI for TLS tests: a CA, and a server and a client
//! certificate it signed, as PEM files in a temporary directory.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// `ca.pem`, `server.pem`/`server.key` (for `localhost` and `127.0.0.1`) and
/// `client.pem`/`client.key`, removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the files; the client certificate is issued to `client_name`.
    pub fn new(client_name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "torchwire test CA");
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::from_params(&ca, &ca_key);

        for (name, sans, usage) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec![client_name.to_string()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(DnType::CommonName, name);
            write(
                &format!("{name}.pem"),
                params.signed_by(&key, &issuer).unwrap().pem(),
            );
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Self { dir }
    }

    /// The path of one of the files, as a flag value.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The contents of one of the files.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }
}

//! Certificates made at run time for TLS tests: a CA, and server and client certificates it signs. Nothing is
//! written to disk; the PEM text goes straight into the silo's and the client's settings.

use grains_silo::PemSource;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, as PEM text.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate.
    pub cert: PemSource,
    /// Its private key.
    pub key: PemSource,
}

/// A certificate authority made for one test.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate the CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA's certificate, for the side that verifies.
    pub fn cert(&self) -> PemSource {
        PemSource::new(self.pem.clone())
    }

    /// A server certificate for 127.0.0.1 and `localhost`.
    pub fn server(&self) -> Pair {
        self.sign("grains silo", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose subject's common name is `name`.
    pub fn client(&self, name: &str) -> Pair {
        self.sign(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn sign(&self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().expect("generate a key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("sign the certificate");
        Pair { cert: PemSource::new(cert.pem()), key: PemSource::new(key.serialize_pem()) }
    }
}

//! Atoll's own certificate authority: a root (kept offline by the user if
//! they wish) and an intermediate that signs every node's short-lived
//! certificate. Nodes trust the root, so a new intermediate changes nothing
//! for them.
//!
//! A CA directory holds, each as PEM:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `root.pem` | the root certificate: what nodes trust | 0644 |
//! | `root.key` | the root's key (absent when the user keeps it offline, or brought their own intermediate) | 0600 |
//! | `intermediate.pem` | the intermediate certificate | 0644 |
//! | `intermediate.key` | the intermediate's key: what the control plane signs with | 0600 |

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use time::OffsetDateTime;

use crate::id::AtollId;

/// What is wrong, with the file and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CaError(pub String);

/// Lifetimes of a new CA.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// The root's (default 10 years).
    pub root_lifetime: Duration,
    /// The intermediate's (default 1 year).
    pub intermediate_lifetime: Duration,
    /// The organization named in both (default `Atoll`).
    pub organization: String,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            root_lifetime: Duration::from_secs(10 * 365 * 24 * 3600),
            intermediate_lifetime: Duration::from_secs(365 * 24 * 3600),
            organization: "Atoll".into(),
        }
    }
}

/// How far back an issued certificate's validity starts, for clocks a
/// little behind the CA's.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// When a certificate (the first of a PEM chain) was issued and when it
/// ends: `(not_before + BACKDATE, not_after)`.
pub fn validity_of_pem(pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| CaError(format!("not a PEM certificate: {e}")))?;
    let certificate = block
        .parse_x509()
        .map_err(|e| CaError(format!("the certificate cannot be read: {e}")))?;
    let validity = certificate.validity();
    Ok((
        validity.not_before.to_datetime() + BACKDATE,
        validity.not_after.to_datetime(),
    ))
}

/// The SHA-256 of a certificate's DER, in hex: how nodes tell one
/// intermediate from another.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprints of every certificate of a PEM bundle, in order: for a
/// node's chain, its own certificate then the intermediate that signed it.
pub fn fingerprints_of_pem(pem: &str) -> Vec<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map_while(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| fingerprint(&block.contents))
        .collect()
}

/// The host names and addresses (DNS and IP SANs) of the first certificate
/// of a PEM chain: a replica's, which it keeps when it renews.
pub fn hosts_of_pem(pem: &str) -> Vec<String> {
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok(certificate) = block.parse_x509() else {
        return Vec::new();
    };
    let Ok(Some(names)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The fingerprint of the intermediate in a node's chain (leaf then
/// intermediate), if it has one.
pub fn intermediate_of_chain(pem: &str) -> Option<String> {
    fingerprints_of_pem(pem).into_iter().nth(1)
}

/// Where the key of an issued certificate comes from.
#[derive(Clone, Copy, Debug)]
pub enum KeySource<'a> {
    /// The node made its key and sent a certificate signing request (PEM);
    /// only its public key is used, nothing else it asks for.
    Csr(&'a str),
    /// The CA makes the key (for the sandbox, and for `atoll ca issue`).
    Generate,
}

/// A certificate to issue.
#[derive(Clone, Debug)]
pub struct IssueRequest<'a> {
    /// Who it is for: its only URI SAN.
    pub id: &'a AtollId,
    /// The key.
    pub key: KeySource<'a>,
    /// How long it is valid (cut at the intermediate's own end).
    pub lifetime: Duration,
    /// DNS names and IP addresses it serves at (control-plane replicas,
    /// gateways), for clients that check the host name.
    pub hosts: &'a [String],
}

/// An issued certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf then the intermediate, PEM.
    pub chain_pem: String,
    /// The key, PEM, when the CA made it.
    pub key_pem: Option<String>,
    /// When it stops being valid.
    pub not_after: OffsetDateTime,
    /// Its serial number, hex.
    pub serial: String,
}

/// A loaded CA that can issue.
pub struct Authority {
    dir: PathBuf,
    root_pem: String,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    intermediate_not_after: OffsetDateTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("intermediate_not_after", &self.intermediate_not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no randomness at all.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn lifetime(from: OffsetDateTime, lifetime: Duration) -> OffsetDateTime {
    from + time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(365 * 100))
}

fn read(dir: &Path, file: &str) -> Result<String, CaError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        CaError(format!(
            "cannot read {}: {e}; make a CA with `atoll ca init --dir {}`",
            path.display(),
            dir.display()
        ))
    })
}

/// Writes `text` to `dir/file` with `mode`, replacing it atomically.
fn write(dir: &Path, file: &str, text: &str, mode: u32) -> Result<(), CaError> {
    let path = dir.join(file);
    let temporary = dir.join(format!(".{file}.new"));
    let fail = |e: std::io::Error| CaError(format!("cannot write {}: {e}", path.display()));
    let _ = std::fs::remove_file(&temporary);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(fail)?;
    out.write_all(text.as_bytes()).map_err(fail)?;
    out.sync_all().map_err(fail)?;
    std::fs::rename(&temporary, &path).map_err(fail)
}

fn ca_params(
    name: &str,
    organization: &str,
    not_after: OffsetDateTime,
    path_length: Option<u8>,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CaError(format!("CA parameters: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, organization);
    params.distinguished_name = dn;
    params.is_ca = match path_length {
        Some(length) => IsCa::Ca(BasicConstraints::Constrained(length)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn not_after_of(pem: &str, what: &str) -> Result<OffsetDateTime, CaError> {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c)
        .map_err(|e| CaError(format!("{what} is not a PEM certificate: {e}")))?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError(format!("{what} cannot be read: {e}")))?;
    OffsetDateTime::from_unix_timestamp(certificate.validity().not_after.timestamp())
        .map_err(|e| CaError(format!("{what} has an unusable end date: {e}")))
}

impl Authority {
    /// Makes a root and an intermediate in `dir` (created 0700). Refuses a
    /// directory that already holds a CA.
    pub fn init(dir: &Path, options: &CaOptions) -> Result<Self, CaError> {
        if dir.join("intermediate.pem").exists() || dir.join("root.pem").exists() {
            return Err(CaError(format!(
                "{} already holds a CA; use it, rotate its intermediate with `atoll ca rotate`, or choose another --dir",
                dir.display()
            )));
        }
        Self::make_dir(dir)?;
        let now = OffsetDateTime::now_utc();
        let root_key =
            KeyPair::generate().map_err(|e| CaError(format!("making the root key: {e}")))?;
        let root_params = ca_params(
            "Atoll root CA",
            &options.organization,
            lifetime(now, options.root_lifetime),
            None,
        )?;
        let root = root_params
            .self_signed(&root_key)
            .map_err(|e| CaError(format!("signing the root: {e}")))?;
        write(dir, "root.key", &root_key.serialize_pem(), 0o600)?;
        write(dir, "root.pem", &root.pem(), 0o644)?;
        let root_issuer = Issuer::new(root_params, root_key);
        Self::new_intermediate(
            dir,
            &root_issuer,
            &options.organization,
            options.intermediate_lifetime,
        )?;
        Self::load(dir)
    }

    /// A new intermediate signed by the root in `dir` (which must hold
    /// `root.key`): certificates issued from now on chain to it, and to the
    /// same root, so nodes move to it at their next renewal.
    pub fn rotate(dir: &Path, intermediate_lifetime: Duration) -> Result<Self, CaError> {
        let root_pem = read(dir, "root.pem")?;
        let root_key_pem = std::fs::read_to_string(dir.join("root.key")).map_err(|e| {
            CaError(format!(
                "cannot read {}: {e}; rotating the intermediate needs the root's key (bring it back from where it is kept offline)",
                dir.join("root.key").display()
            ))
        })?;
        let root_key = KeyPair::from_pem(&root_key_pem)
            .map_err(|e| CaError(format!("root.key is not a usable key: {e}")))?;
        let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key)
            .map_err(|e| CaError(format!("root.pem cannot be read: {e}")))?;
        Self::new_intermediate(dir, &root_issuer, "Atoll", intermediate_lifetime)?;
        Self::load(dir)
    }

    /// Takes an intermediate the user brings (signed by their own root):
    /// `root_pem` is what nodes will trust.
    pub fn bring_your_own(
        dir: &Path,
        root_pem: &str,
        intermediate_pem: &str,
        intermediate_key_pem: &str,
    ) -> Result<Self, CaError> {
        Self::make_dir(dir)?;
        // Both must be certificates, and the key the intermediate's.
        not_after_of(root_pem, "the root certificate")?;
        not_after_of(intermediate_pem, "the intermediate certificate")?;
        let key = KeyPair::from_pem(intermediate_key_pem)
            .map_err(|e| CaError(format!("the intermediate's key is not a usable key: {e}")))?;
        let parsed: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(intermediate_pem.as_bytes())
                .map_err(|e| CaError(format!("the intermediate is not PEM: {e}")))?;
        let (_, certificate) = x509_parser::parse_x509_certificate(&parsed)
            .map_err(|e| CaError(format!("the intermediate cannot be read: {e}")))?;
        if certificate.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError(
                "the intermediate's key does not belong to the intermediate certificate".into(),
            ));
        }
        if !certificate.is_ca() {
            return Err(CaError(
                "the intermediate certificate is not a CA (basicConstraints CA:TRUE is needed)"
                    .into(),
            ));
        }
        write(dir, "root.pem", root_pem, 0o644)?;
        write(dir, "intermediate.pem", intermediate_pem, 0o644)?;
        write(dir, "intermediate.key", intermediate_key_pem, 0o600)?;
        Self::load(dir)
    }

    fn make_dir(dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CaError(format!("cannot create {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| CaError(format!("cannot make {} private: {e}", dir.display())))
    }

    fn new_intermediate(
        dir: &Path,
        root: &Issuer<'_, KeyPair>,
        organization: &str,
        intermediate_lifetime: Duration,
    ) -> Result<(), CaError> {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()
            .map_err(|e| CaError(format!("making the intermediate key: {e}")))?;
        let name = format!("Atoll intermediate CA {}", now.unix_timestamp());
        let params = ca_params(
            &name,
            organization,
            lifetime(now, intermediate_lifetime),
            Some(0),
        )?;
        let certificate = params
            .signed_by(&key, root)
            .map_err(|e| CaError(format!("signing the intermediate: {e}")))?;
        // The key first: a crash between the two leaves the old pair
        // unreadable together rather than a certificate without its key.
        write(dir, "intermediate.key", &key.serialize_pem(), 0o600)?;
        write(dir, "intermediate.pem", &certificate.pem(), 0o644)
    }

    /// Loads the CA of `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let root_pem = read(dir, "root.pem")?;
        let intermediate_pem = read(dir, "intermediate.pem")?;
        let key_pem = read(dir, "intermediate.key")?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            CaError(format!(
                "{} is not a usable key: {e}",
                dir.join("intermediate.key").display()
            ))
        })?;
        let intermediate_not_after = not_after_of(&intermediate_pem, "intermediate.pem")?;
        // `atoll ca rotate` writes the key, then the certificate: a load in
        // between would sign with a key the certificate does not name.
        let (_, block) = x509_parser::pem::parse_x509_pem(intermediate_pem.as_bytes())
            .map_err(|e| CaError(format!("intermediate.pem is not a PEM certificate: {e}")))?;
        let parsed = block
            .parse_x509()
            .map_err(|e| CaError(format!("intermediate.pem cannot be read: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError(format!(
                "{} is not the key of {} (an intermediate being rotated? try again in a moment; else restore the pair)",
                dir.join("intermediate.key").display(),
                dir.join("intermediate.pem").display()
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&intermediate_pem, key).map_err(|e| {
            CaError(format!(
                "{} cannot be read: {e}",
                dir.join("intermediate.pem").display()
            ))
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            root_pem,
            intermediate_pem,
            issuer,
            intermediate_not_after,
        })
    }

    /// What nodes trust: the root, PEM.
    pub fn trust_pem(&self) -> &str {
        &self.root_pem
    }

    /// The intermediate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// When the intermediate ends.
    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    /// Issues a certificate for `request.id`.
    pub fn issue(&self, request: &IssueRequest<'_>) -> Result<Issued, CaError> {
        let now = OffsetDateTime::now_utc();
        let not_after = lifetime(now, request.lifetime).min(self.intermediate_not_after);
        if not_after <= now {
            return Err(CaError(format!(
                "the intermediate in {} has expired; rotate it with `atoll ca rotate`",
                self.dir.display()
            )));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CaError(format!("certificate parameters: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.id.to_string());
        params.distinguished_name = dn;
        let uri = request
            .id
            .to_string()
            .try_into()
            .map_err(|e| CaError(format!("{} cannot be a URI SAN: {e}", request.id)))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for host in request.hosts {
            match host.parse::<IpAddr>() {
                Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_) => params.subject_alt_names.push(SanType::DnsName(
                    host.as_str()
                        .try_into()
                        .map_err(|e| CaError(format!("`{host}` is not a host name: {e}")))?,
                )),
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = serial
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let (certificate, key_pem) = match request.key {
            KeySource::Csr(pem) => {
                let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
                    CaError(format!(
                        "the certificate signing request is not valid (PEM `CERTIFICATE REQUEST`, signed by its key): {e}"
                    ))
                })?;
                let certificate = params
                    .signed_by(&csr.public_key, &self.issuer)
                    .map_err(|e| CaError(format!("signing: {e}")))?;
                (certificate, None)
            }
            KeySource::Generate => {
                let key = KeyPair::generate().map_err(|e| CaError(format!("making a key: {e}")))?;
                let certificate = params
                    .signed_by(&key, &self.issuer)
                    .map_err(|e| CaError(format!("signing: {e}")))?;
                (certificate, Some(key.serialize_pem()))
            }
        };
        Ok(Issued {
            chain_pem: format!("{}{}", certificate.pem(), self.intermediate_pem),
            key_pem,
            not_after,
            serial: serial_hex,
        })
    }
}

/// A key and a certificate signing request for `id`, as a node makes them
/// before it joins: the key never leaves the node. Returns (key PEM, CSR PEM).
pub fn key_and_request(id: &AtollId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError(format!("making a key: {e}")))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CaError(format!("request parameters: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, id.to_string());
    let request = params
        .serialize_request(&key)
        .map_err(|e| CaError(format!("making the request: {e}")))?;
    let pem = request
        .pem()
        .map_err(|e| CaError(format!("encoding the request: {e}")))?;
    Ok((key.serialize_pem(), pem))
}

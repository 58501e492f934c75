//! API keys: who may call lockd, in which namespace, and with which access.
//!
//! The auth file (`LOCKD_AUTH_FILE`, TOML) lists keys by the SHA-256 of the key, never the key
//! itself. A client sends `authorization: Bearer <key>`; lockd hashes it and compares the digest
//! with every entry in constant time. Each key has a name (for logs: the key itself is never
//! logged), a namespace, and an access level. The namespace is part of every resource name that
//! reaches the lock core (`<namespace>:<name>`), and so of every Redis key and every event, and
//! clients only ever see names inside their own namespace ([`Namespace`]).
//!
//! SIGHUP reloads the file ([`Auth::reload`]); a key that is gone, or whose namespace or access
//! changed, stops working at once, even on open streams ([`Caller::check`], [`Caller::revoked`]).
//! With no auth file, lockd runs open: every caller is let in with write access and resource
//! names are used as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;
/// Longest `authorization` value lockd looks at; a longer one is refused unread.
const MAX_AUTHORIZATION_BYTES: usize = 512;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// IsLocked, GetOwner, ListLocks, Watch.
    Read,
    /// Everything.
    Write,
}

impl Access {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// Where a caller's resource names live. Qualified names are `<namespace>:<name>`; since a
/// namespace holds no `:`, two namespaces never share a name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace(Option<Arc<str>>);

impl Namespace {
    /// No namespace (lockd runs open): names are used as they are.
    pub fn open() -> Self {
        Self(None)
    }

    /// The name the lock core uses for the client's `name`.
    pub fn qualify(&self, name: String) -> String {
        match &self.0 {
            None => name,
            Some(ns) => format!("{ns}:{name}"),
        }
    }

    /// The client's name for a core name of this namespace; `None` for a name outside it.
    pub fn strip<'a>(&self, qualified: &'a str) -> Option<&'a str> {
        match &self.0 {
            None => Some(qualified),
            Some(ns) => qualified.strip_prefix(&**ns)?.strip_prefix(':'),
        }
    }

    /// The client's name for a core name that is known to be in this namespace (it came from
    /// a request of this caller).
    pub fn unqualify(&self, qualified: String) -> String {
        match self.strip(&qualified) {
            Some(name) if name.len() != qualified.len() => name.to_owned(),
            _ => qualified,
        }
    }
}

/// One key of the auth file.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    name: Arc<str>,
    namespace: Arc<str>,
    access: Access,
    digest: [u8; 32],
}

/// The keys of one version of the auth file.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<Arc<Entry>>,
}

impl KeySet {
    /// Parses an auth file's text.
    ///
    /// ```toml
    /// [[keys]]
    /// name = "billing-scheduler"   # for logs and metrics
    /// namespace = "billing"        # letters, digits, `-`, `_`, `.`; at most 64 bytes
    /// access = "write"             # or "read"
    /// sha256 = "9f86d0…"           # hex SHA-256 of the key (`lockd keygen` prints it)
    /// ```
    fn parse(text: &str) -> Result<Self, String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
        if let Some(other) = doc.keys().find(|k| *k != "keys") {
            return Err(format!("unknown top-level entry `{other}` (only [[keys]])"));
        }
        let Some(keys) = doc.get("keys") else {
            return Ok(Self::default());
        };
        let keys = keys
            .as_array()
            .ok_or("`keys` must be an array of tables ([[keys]])")?;
        let mut entries: Vec<Arc<Entry>> = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let entry = parse_entry(key).map_err(|e| format!("keys[{i}]: {e}"))?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(format!("keys[{i}]: name `{}` is used twice", entry.name));
            }
            if entries.iter().any(|e| e.digest == entry.digest) {
                return Err(format!(
                    "keys[{i}] (`{}`): the same key is listed twice",
                    entry.name
                ));
            }
            entries.push(Arc::new(entry));
        }
        Ok(Self { entries })
    }

    /// The entry whose digest is `digest`. Every entry is compared, each in constant time, so
    /// the time taken says nothing about which bytes matched.
    fn find(&self, digest: &[u8; 32]) -> Option<&Arc<Entry>> {
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.digest, digest) {
                found = Some(entry);
            }
        }
        found
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file lists no key (then no call is let in).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_entry(key: &toml::Value) -> Result<Entry, String> {
    let table = key.as_table().ok_or("must be a table")?;
    if let Some(other) = table
        .keys()
        .find(|k| !["name", "namespace", "access", "sha256"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field `{other}` (name, namespace, access, sha256)"
        ));
    }
    let field = |f: &str| {
        table
            .get(f)
            .and_then(toml::Value::as_str)
            .ok_or_else(|| format!("`{f}` is required and must be a string"))
    };
    let name = field("name")?;
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err("`name` must be 1 to 64 bytes without control characters".into());
    }
    let namespace = field("namespace")?;
    check_namespace(namespace)?;
    let access = Access::parse(field("access")?).ok_or("`access` must be \"read\" or \"write\"")?;
    let digest = parse_digest(field("sha256")?).ok_or(
        "`sha256` must be 64 hex digits (the SHA-256 of the key, as `lockd keygen` prints)",
    )?;
    Ok(Entry {
        name: name.into(),
        namespace: namespace.into(),
        access,
        digest,
    })
}

/// A namespace: 1 to 64 bytes of ASCII letters, digits, `-`, `_` and `.`.
fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_BYTES
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`namespace` must be 1 to {MAX_NAMESPACE_BYTES} ASCII letters, digits, `-`, `_` or `.` (got {ns:?})"
        ))
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        // Two hex digits are at most 255.
        out[i] = u8::try_from(high * 16 + low).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key and the auth-file entry that admits it.
pub fn generate(name: &str, namespace: &str, access: &str) -> Result<(String, String), String> {
    check_namespace(namespace)?;
    let access = Access::parse(access).ok_or("access must be \"read\" or \"write\"")?;
    // Two version-4 UUIDs: 244 random bits from the OS generator.
    let key = format!(
        "lockd_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let entry = format!(
        "[[keys]]\nname = {name:?}\nnamespace = {namespace:?}\naccess = {:?}\nsha256 = {:?}\n",
        access.as_str(),
        to_hex(&digest(&key)),
    );
    Ok((key, entry))
}

/// The keys lockd accepts now, reloaded on SIGHUP. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auth {
    file: Option<PathBuf>,
    keys: Arc<watch::Sender<Arc<KeySet>>>,
}

impl Auth {
    /// lockd without an auth file: every call is let in.
    pub fn open() -> Self {
        Self {
            file: None,
            keys: Arc::new(watch::Sender::new(Arc::default())),
        }
    }

    /// Reads the auth file.
    ///
    /// # Errors
    /// The file cannot be read or breaks a rule; the message names the entry and the rule.
    pub fn load(file: &Path) -> Result<Self, String> {
        let keys = read(file)?;
        Ok(Self {
            file: Some(file.to_owned()),
            keys: Arc::new(watch::Sender::new(Arc::new(keys))),
        })
    }

    /// Whether an auth file is in force.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the auth file again and puts it in force; on an error the keys in force stay.
    /// Returns how many keys it holds.
    ///
    /// # Errors
    /// As [`Auth::load`].
    pub fn reload(&self) -> Result<usize, String> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        let keys = read(file)?;
        let n = keys.len();
        self.keys.send_replace(Arc::new(keys));
        Ok(n)
    }

    /// Who sends a request with `metadata`, if it may do what needs `access`.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a missing, malformed or unknown key; `PERMISSION_DENIED` for a
    /// read key on a write call.
    pub fn caller(&self, metadata: &MetadataMap, access: Access, rpc: &str) -> Result<Caller> {
        if self.file.is_none() {
            return Ok(Caller { key: None });
        }
        let key = bearer(metadata)?;
        let keys = self.keys.subscribe();
        let entry = keys.borrow().find(&digest(key)).cloned();
        let Some(entry) = entry else {
            tracing::warn!(rpc, "refused: unknown API key");
            return Err(Error::Unauthenticated("unknown API key".into()));
        };
        if entry.access < access {
            tracing::warn!(rpc, key = %entry.name, "refused: read-only API key");
            return Err(Error::PermissionDenied(format!(
                "API key `{}` has read access; {rpc} needs write access",
                entry.name
            )));
        }
        Ok(Caller {
            key: Some(KeyInForce { entry, keys }),
        })
    }
}

fn read(file: &Path) -> Result<KeySet, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("auth file {}: {e}", file.display()))?;
    KeySet::parse(&text).map_err(|e| format!("auth file {}: {e}", file.display()))
}

/// The key of an `authorization: Bearer <key>` header.
fn bearer(metadata: &MetadataMap) -> Result<&str> {
    let missing =
        || Error::Unauthenticated("an API key is required: `authorization: Bearer <key>`".into());
    let value = metadata.get("authorization").ok_or_else(missing)?;
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Error::Unauthenticated(format!(
            "the authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes"
        )));
    }
    let value = value.to_str().map_err(|_| {
        Error::Unauthenticated("the authorization header is not printable ASCII".into())
    })?;
    let (scheme, key) = value.trim().split_once(' ').ok_or_else(missing)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(Error::Unauthenticated(
            "the authorization header must be `Bearer <key>`".into(),
        ));
    }
    Ok(key)
}

/// The key a request came with, checked again on every message of a stream.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` when lockd runs open: nothing to check, and nothing to follow.
    key: Option<KeyInForce>,
}

/// A caller's entry, and the key set it is checked against as the file is reloaded.
#[derive(Debug, Clone)]
struct KeyInForce {
    entry: Arc<Entry>,
    keys: watch::Receiver<Arc<KeySet>>,
}

impl Caller {
    /// The caller's namespace.
    pub fn namespace(&self) -> Namespace {
        Namespace(self.key.as_ref().map(|k| k.entry.namespace.clone()))
    }

    /// The key's name, for logs (never the key).
    pub fn name(&self) -> Option<&str> {
        self.key.as_ref().map(|k| &*k.entry.name)
    }

    /// Whether the key is still in force, unchanged, in the auth file as last (re)loaded.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` once the key was removed or changed.
    pub fn check(&self) -> Result<()> {
        let Some(KeyInForce { entry, keys }) = &self.key else {
            return Ok(());
        };
        match keys.borrow().find(&entry.digest) {
            Some(now) if now == entry => Ok(()),
            _ => Err(Error::Unauthenticated(format!(
                "API key `{}` was revoked",
                entry.name
            ))),
        }
    }

    /// Resolves when the key stops being in force (never, when lockd runs open).
    pub async fn revoked(&mut self) -> Error {
        loop {
            if let Err(e) = self.check() {
                return e;
            }
            let changed = match &mut self.key {
                Some(k) => k.keys.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, ns, access, key)| {
                format!(
                    "[[keys]]\nname = {name:?}\nnamespace = {ns:?}\naccess = {access:?}\nsha256 = {:?}\n",
                    to_hex(&digest(key))
                )
            })
            .collect()
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn a_generated_key_is_admitted_by_the_entry_printed_with_it() {
        let (key, entry) = generate("ci", "team-a", "write").unwrap();
        let keys = KeySet::parse(&entry).unwrap();
        let found = keys.find(&digest(&key)).unwrap();
        assert_eq!((&*found.name, &*found.namespace), ("ci", "team-a"));
        assert!(keys.find(&digest("lockd_other")).is_none());
    }

    #[test]
    fn namespaces_qualify_names_so_no_two_namespaces_share_one() {
        let a = Namespace(Some("a".into()));
        let ab = Namespace(Some("a:b".into()));
        assert_eq!(a.qualify("job".into()), "a:job");
        assert_eq!(a.strip("a:job"), Some("job"));
        assert_eq!(a.strip("ab:job"), None);
        assert_eq!(a.strip("job"), None);
        // `:` is refused in namespaces, so `a` + `b:c` cannot meet `a:b` + `c`.
        assert!(check_namespace("a:b").is_err());
        drop(ab);
        assert_eq!(Namespace::open().strip("a:job"), Some("a:job"));
    }

    #[test]
    fn bad_auth_files_are_refused_naming_the_entry_and_the_rule() {
        let bad = [
            ("[[keys]]\nname = \"x\"\n", "`namespace` is required"),
            (
                "[[keys]]\nname = \"x\"\nnamespace = \"a b\"\naccess = \"write\"\nsha256 = \"00\"\n",
                "namespace",
            ),
            (
                "[[keys]]\nname = \"x\"\nnamespace = \"a\"\naccess = \"admin\"\nsha256 = \"00\"\n",
                "access",
            ),
            (
                "[[keys]]\nname = \"x\"\nnamespace = \"a\"\naccess = \"read\"\nsha256 = \"zz\"\n",
                "sha256",
            ),
            (
                "[[keys]]\nname = \"x\"\nnamespace = \"a\"\naccess = \"read\"\nkey = \"k\"\n",
                "unknown field `key`",
            ),
            ("keys = 3", "array"),
            ("[[keys]\n", "TOML"),
        ];
        for (text, rule) in bad {
            let err = KeySet::parse(text).unwrap_err();
            assert!(err.contains(rule), "{text:?}: {err}");
        }
        let twice = file(&[("a", "n", "read", "k1"), ("b", "n", "read", "k1")]);
        assert!(KeySet::parse(&twice).unwrap_err().contains("twice"));
    }

    #[test]
    fn callers_need_a_known_bearer_key_with_enough_access() {
        let dir = std::env::temp_dir().join(format!("lockd-auth-{}", uuid::Uuid::new_v4()));
        std::fs::write(
            &dir,
            file(&[("w", "ns", "write", "kw"), ("r", "ns", "read", "kr")]),
        )
        .unwrap();
        let auth = Auth::load(&dir).unwrap();
        let code = |m: &MetadataMap, a| {
            auth.caller(m, a, "Acquire")
                .map(|_| tonic::Code::Ok)
                .unwrap_or_else(|e| tonic::Status::from(e).code())
        };
        assert_eq!(
            code(&MetadataMap::new(), Access::Read),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&metadata("Bearer nope"), Access::Read),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&metadata("Basic kw"), Access::Read),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&metadata("Bearer"), Access::Read),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&metadata("Bearer kr"), Access::Write),
            tonic::Code::PermissionDenied
        );
        assert_eq!(code(&metadata("Bearer kr"), Access::Read), tonic::Code::Ok);
        assert_eq!(
            code(&metadata("bearer  kw "), Access::Write),
            tonic::Code::Ok
        );
        let caller = auth
            .caller(&metadata("Bearer kw"), Access::Write, "x")
            .unwrap();
        assert_eq!(caller.namespace().qualify("j".into()), "ns:j");
        // Reloaded without the write key: the caller made before is refused from now on.
        std::fs::write(&dir, file(&[("r", "ns", "read", "kr")])).unwrap();
        assert_eq!(auth.reload(), Ok(1));
        assert!(caller.check().is_err());
        // A broken file keeps the keys in force.
        std::fs::write(&dir, "not toml [").unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(code(&metadata("Bearer kr"), Access::Read), tonic::Code::Ok);
        let _ = std::fs::remove_file(&dir);
    }
}

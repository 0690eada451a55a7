//! The command line, as definitions only; `run.rs` implements them.

use clap::{Args, Parser, Subcommand, ValueEnum};
use keyfab_policy::Lifetime;
use std::path::PathBuf;

/// `keyfab --version`: the version, the commit it was built from and that commit's date.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEYFAB_COMMIT"),
    ", ",
    env!("KEYFAB_BUILD_DATE"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "keyfab",
    version = VERSION,
    about = "Secure-manufacturing key injection: HQ decides which keys exist and under which \
             policy; a factory site provisions them within that policy; HQ gets proof.",
    after_help = "Secrets that unlock state come from KEYFAB_PASSPHRASE or --passphrase-file, never \
                  from an argument.\nExit codes: 0 ok, 1 error, 2 usage, 3 refused by policy, \
                  4 verification failed.\n\nEnvironment:\n  \
                  KEYFAB_HOME           the home, for commands that take --home\n  \
                  KEYFAB_PASSPHRASE     the secret that unlocks a home (or a PKCS#11 token's PIN)\n  \
                  KEYFAB_UNSEAL_SHARES  unseal shares of a home sealed by shares, one per line\n  \
                  KEYFAB_NOW            an RFC 3339 time that replaces the clock (drills, tests)\n\n\
                  Start with:  keyfab demo"
)]
pub(crate) struct Cli {
    /// Print exactly one JSON document on stdout (errors too: {"error":{"code","message"}}).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// A node's home, and what unlocks it: every command that opens one takes these (and
/// only those do).
#[derive(Args, Debug, Clone)]
pub(crate) struct Home {
    /// The node's state directory.
    #[arg(long, env = "KEYFAB_HOME", value_name = "DIR")]
    pub home: PathBuf,
    /// Read the passphrase (or a PKCS#11 token's PIN) from this file instead of
    /// KEYFAB_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// For a home sealed by shares: a file holding one unseal share (repeat the flag for
    /// each share; KEYFAB_UNSEAL_SHARES may also list shares, one per line).
    #[arg(long, value_name = "FILE")]
    pub unseal_share_file: Vec<PathBuf>,
}

/// The unlocking flags of the command line's own command (its `Home`), read from the
/// parsed arguments wherever that command sits.
/// The arguments of `site serve` given on the command line (not defaults): a
/// `--config` file sets only the others.
pub(crate) fn explicit_serve_args(matches: &clap::ArgMatches) -> Vec<String> {
    let Some(serve) = matches
        .subcommand_matches("site")
        .and_then(|m| m.subcommand_matches("serve"))
    else {
        return Vec::new();
    };
    serve
        .ids()
        .filter(|id| {
            serve.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|id| id.as_str().to_owned())
        .collect()
}

pub(crate) fn home_secrets(matches: &clap::ArgMatches) -> (Option<PathBuf>, Vec<PathBuf>) {
    let mut leaf = matches;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    let file = leaf
        .try_get_one::<PathBuf>("passphrase_file")
        .ok()
        .flatten()
        .cloned();
    let shares = leaf
        .try_get_many::<PathBuf>("unseal_share_file")
        .ok()
        .flatten()
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    (file, shares)
}

#[derive(Args, Debug)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    pub home: Home,
    /// The cluster's name: 1-64 of a-z 0-9 . _ - (it becomes the certificate's CN).
    #[arg(long)]
    pub name: String,
    /// Seal the keystore with an unseal key split into N shares instead of a passphrase,
    /// one for each holder. Needs --unseal-threshold, and --share-recipients (each share
    /// sealed to its holder) or --print-shares (shown in clear, once).
    #[arg(long, value_name = "N", requires = "unseal_threshold")]
    pub unseal_shares: Option<u8>,
    /// How many of the shares unseal the keystore (2..=N).
    #[arg(long, value_name = "M", requires = "unseal_shares")]
    pub unseal_threshold: Option<u8>,
    /// The holders' public keys (`keyfab holder keygen`), N of them, comma-separated:
    /// each share is sealed to one and written as NAME.kfs beside nothing else.
    #[arg(
        long,
        value_name = "A.pub,B.pub,...",
        value_delimiter = ',',
        requires = "unseal_shares",
        conflicts_with = "print_shares"
    )]
    pub share_recipients: Vec<PathBuf>,
    /// Where the sealed shares go (NAME.kfs for each NAME.pub; default: the current
    /// directory). Hand each file to its holder.
    #[arg(long, value_name = "DIR", requires = "share_recipients")]
    pub shares_out: Option<PathBuf>,
    /// Show the shares in clear, this once, instead of sealing them to holders.
    #[arg(long, requires = "unseal_shares")]
    pub print_shares: bool,
    /// Bind the site's state to a TPM 2.0 monotonic counter, so that a copy of the home
    /// put back is refused at once (`rollback_detected`): `tpm:device=/dev/tpmrm0` or
    /// `tpm:swtpm=HOST:PORT`, with `,index=0x01xxxxxx` for an NV index other than
    /// 0x01004b46. Sites only, on the embedded store.
    #[arg(long, value_name = "SPEC")]
    pub rollback_counter: Option<String>,
    /// Where the identity keys live: `software` (a keystore file sealed in HOME), or a
    /// PKCS#11 token, `pkcs11:module=PATH,token=LABEL[,sessions=N]`, whose user PIN is
    /// then the secret KEYFAB_PASSPHRASE or --passphrase-file gives.
    #[arg(
        long,
        value_name = "SPEC",
        default_value = "software",
        conflicts_with = "unseal_shares"
    )]
    pub custody: String,
    /// Where the node's state lives: `embedded` (HOME/state.redb), or an etcd cluster
    /// several nodes of one site share, `etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]`
    /// (namespace `keyfab/NAME` by default), or `etcds://...` over TLS (with --etcd-ca).
    /// More nodes: copy this home (docs/OPERATIONS.md).
    #[arg(long, value_name = "SPEC", default_value = "embedded")]
    pub store: String,
    /// With `--store etcds://...` (TLS to etcd): the CA of the members' certificates.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This node's client certificate for etcd (PEM), when the members require one.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM; kept where it is, read at each start).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl InitArgs {
    /// A home sealed by the passphrase (the demo's and the benchmarks').
    pub(crate) fn with_passphrase(home: &std::path::Path, name: &str) -> Self {
        Self {
            home: Home {
                home: home.to_owned(),
                passphrase_file: None,
                unseal_share_file: Vec::new(),
            },
            name: name.to_owned(),
            unseal_shares: None,
            unseal_threshold: None,
            share_recipients: Vec::new(),
            shares_out: None,
            print_shares: false,
            rollback_counter: None,
            custody: "software".into(),
            store: "embedded".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct InstallCertArgs {
    #[command(flatten)]
    pub home: Home,
    /// The cluster certificate from `keyfab pki issue` (PEM).
    #[arg(long, value_name = "CERT")]
    pub cert: PathBuf,
    /// The root certificate to trust from now on (ROOT/root.crt).
    #[arg(long, value_name = "ROOT_CERT")]
    pub root_cert: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// The offline root CA.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Headquarters: sites, entitlements.
    #[command(subcommand)]
    Hq(HqCommand),
    /// A factory site.
    #[command(subcommand)]
    Site(SiteCommand),
    /// A production-line station: talks to `keyfab site serve` over mutual TLS.
    #[command(subcommand)]
    Station(StationCommand),
    /// Approvers' personal keys.
    #[command(subcommand)]
    Approver(ApproverCommand),
    /// Unseal-share holders' personal keys: shares are sealed to them.
    #[command(subcommand)]
    Holder(HolderCommand),
    /// Policy modules (WebAssembly rules that travel in the entitlement).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the whole journey in a temporary directory and say what happens at each step.
    #[command(after_help = "Example:\n  keyfab demo\n  keyfab demo --dir /tmp/kf --devices 5000")]
    Demo {
        /// Keep everything in DIR, a new or empty directory (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Devices in the demo entitlement.
        #[arg(long, default_value_t = 1000)]
        devices: u64,
    },
    /// Measure keyfab against the raw crypto rate of this machine.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Shell completions for bash, zsh or fish, on standard output.
    #[command(
        after_help = "Examples:\n  keyfab completions bash > /usr/share/bash-completion/completions/keyfab\n  keyfab completions zsh > /usr/share/zsh/vendor-completions/_keyfab\n  keyfab completions fish > /usr/share/fish/vendor_completions.d/keyfab.fish"
    )]
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
    /// Write the manual pages (roff, section 1), one per command — keyfab.1,
    /// keyfab-site.1, keyfab-site-provision.1, … — into DIR.
    #[command(
        after_help = "Example:\n  keyfab man --out /usr/share/man/man1 && man keyfab-site-serve"
    )]
    Man {
        /// The directory (created if missing; pages of the same names are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// A shell `keyfab completions` writes for.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
pub(crate) enum PkiCommand {
    /// Create the root CA: ROOT/root.crt and the sealed root key.
    #[command(
        after_help = "Example:\n  KEYFAB_PASSPHRASE=... keyfab pki init-root --home root --subject \"CN=Acme Root CA,O=Acme\""
    )]
    InitRoot {
        #[command(flatten)]
        home: Home,
        /// Distinguished name of the root (CN, O, OU, C, ST, L).
        #[arg(long)]
        subject: String,
        /// Validity: a number of days, or "forever" (notAfter 99991231235959Z). The root
        /// is in every device chain: it must outlast every device certificate.
        #[arg(long, default_value = "forever", value_parser = parse_lifetime)]
        days: Lifetime,
    },
    /// Sign a cluster CSR (from `hq init` or `site init`) as an HQ or site cluster CA.
    #[command(
        after_help = "Example:\n  keyfab pki issue --home root --csr hq/cluster.csr --role hq --out hq.crt"
    )]
    Issue {
        #[command(flatten)]
        home: Home,
        /// The CSR a cluster wrote at init (HOME/cluster.csr).
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// hq or site: what the cluster may act as, for ever.
        #[arg(long)]
        role: CertRole,
        /// Where to write the certificate (PEM).
        #[arg(long, value_name = "CERT")]
        out: PathBuf,
        /// Validity: a number of days, or "forever"; never beyond the root's. Default:
        /// forever for hq (its certificate is in every device chain, so it must outlast
        /// every device certificate), 1825 for a site.
        #[arg(long, value_parser = parse_lifetime)]
        days: Option<Lifetime>,
    },
    /// Create a chip vendor for drills: DIR/vendor-root.crt (the root a policy's
    /// `[chips] roots` lists) and DIR/vendor.key, with which `station run --chip-vendor
    /// DIR` certifies its simulated chips.
    #[command(after_help = "Example:
  keyfab pki init-chip-vendor --dir chip-vendor --subject \"CN=Drill Chips Root,O=Drill Semiconductors\"\n\nThe vendor key is kept in clear (mode 0600): a drill's, to stand in for the vendor\nthat certified a real secure element's key at its factory. A real policy lists the\nroot its chip vendor publishes.")]
    InitChipVendor {
        /// The vendor's directory (created; refused if it holds a vendor already).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Distinguished name of the vendor's root (CN, O, OU, C, ST, L).
        #[arg(long, default_value = "CN=Drill Chip Vendor Root")]
        subject: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HqCommand {
    /// Create HQ's state and its cluster CSR (HOME/cluster.csr).
    #[command(after_help = "Example:\n  keyfab hq init --home hq --name acme-hq")]
    Init(InitArgs),
    /// New service keys (signing, encryption) and certificates for HQ; the previous ones
    /// still open and verify what was sealed and signed with them.
    #[command(
        after_help = "Example:\n  keyfab hq rotate-keys --home hq\n\nSites learn HQ's new encryption key from the next entitlement HQ sends them."
    )]
    RotateKeys {
        #[command(flatten)]
        home: Home,
    },
    /// Install the cluster certificate the root issued; HQ then issues its service keys.
    #[command(
        after_help = "Example:\n  keyfab hq install-cert --home hq --cert hq.crt --root-cert root/root.crt"
    )]
    InstallCert(InstallCertArgs),
    /// The site registry.
    #[command(subcommand)]
    Site(HqSiteCommand),
    /// Audit bundles from sites.
    #[command(subcommand)]
    Audit(HqAuditCommand),
    /// HQ on one screen: each site and how fresh its audit is, each entitlement (state,
    /// released against its quota, window, when it pauses for want of an audit), the
    /// violations — and first, what needs a person soon.
    #[command(
        after_help = "Examples:\n  keyfab hq status --home hq\n  keyfab --json hq status --home hq | jq .warnings\n\nWhat HQ knows comes from the audits it imported: a site's latest provisioning\nshows once it has exported it."
    )]
    Status {
        #[command(flatten)]
        home: Home,
    },
    /// Per site and entitlement: today against the daily limit, total against the quota,
    /// refusals by code, violations.
    #[command(
        after_help = "Examples:\n  keyfab hq report --home hq\n  keyfab hq report --home hq --format json --out report.json\n  keyfab hq report --home hq --format html --out report.html"
    )]
    Report {
        #[command(flatten)]
        home: Home,
        /// text (a table), json, or html (one self-contained file with charts; needs --out):
        /// what is printed, or written to --out.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Write the report to FILE instead of standard output, which then gets one line
        /// saying where (a JSON summary under --json).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Device manifest of an entitlement from verified audit data: one row per device
    /// certificate with the device's status (programmed, failed, unconfirmed), station,
    /// time, audit record, certificate and its SHA-256, sorted by device id.
    #[command(
        after_help = "Examples:\n  keyfab hq manifest --home hq --entitlement ID --format csv --out devices.csv --ca-out batch-ca.pem\n  keyfab hq manifest --home hq --entitlement ID --format aws-iot --out bulk.jsonl --ca-out batch-ca.pem\n\nDevices whose keys were burned (confirmed failed) are left out unless --include-failed.\ncsv: one line per device certificate; the certificate is base64 DER in one field.\naws-iot: one JSON object per line with ThingName, SerialNumber, CertificatePem and\nCACertificatePem, the parameters of the bulk-registration template in docs/CLOUDS.md.\n--ca-out writes the batch CA and the chain to the root (PEM), what a cloud registers."
    )]
    Manifest {
        #[command(flatten)]
        home: Home,
        /// The entitlement whose devices to list (see `keyfab hq entitlement list`).
        #[arg(long)]
        entitlement: String,
        /// csv, json, or aws-iot (JSON lines for AWS IoT bulk registration).
        #[arg(long, value_enum)]
        format: ManifestFormat,
        /// Where to write the manifest (a new file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also list certificates whose keys were burned: status failed (programming
        /// failed) or superseded (a re-provisioning replaced them).
        #[arg(long)]
        include_failed: bool,
        /// Only the certificates of this key (by its policy name). aws-iot needs one key
        /// per device: given, or the only key the policy certifies.
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Also write the batch CA certificate and its chain to the root (PEM, batch CA
        /// first) to this new file.
        #[arg(long, value_name = "FILE")]
        ca_out: Option<PathBuf>,
    },
    /// Entitlements.
    #[command(subcommand)]
    Entitlement(HqEntitlementCommand),
    /// One device: its provenance, and revocation of its certificates.
    #[command(subcommand)]
    Device(HqDeviceCommand),
    /// Sign a certificate revocation list (RFC 5280 CRL v2) for an entitlement's batch CA,
    /// listing every device certificate HQ revoked under it.
    #[command(
        after_help = "Example:\n  keyfab hq crl --home hq --entitlement ID --out ID.crl --days 7\n\nPublish the file where the profile's crl_distribution_point says, before its next update.\nCheck it with: openssl crl -in ID.crl -CAfile batch-ca.pem -noout (\"verify OK\")."
    )]
    Crl {
        #[command(flatten)]
        home: Home,
        /// The entitlement whose batch CA signs it.
        #[arg(long)]
        entitlement: String,
        /// Where to write the CRL (PEM; a new file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Days until its next update (1-3650): relying parties treat it as stale after
        /// that.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HqDeviceCommand {
    /// Revoke a device's certificates: recorded at HQ, listed by the next `hq crl` of its
    /// entitlement, shown as `revoked` by `hq manifest` and `hq device show`.
    #[command(
        after_help = "Examples:\n  keyfab hq device revoke --home hq --entitlement ID --device-id TSV2-00000042 --reason key-compromise\n  keyfab hq device revoke --home hq --entitlement ID --device-id TSV2-00000042 --reason superseded --superseded-only\n\nThe device must be in the audit HQ verified (import the site's export first)."
    )]
    Revoke {
        #[command(flatten)]
        home: Home,
        /// The entitlement the device's certificates came from.
        #[arg(long)]
        entitlement: String,
        /// The device.
        #[arg(long)]
        device_id: String,
        /// Why (RFC 5280 reason code): unspecified, key-compromise, affiliation-changed,
        /// superseded, cessation-of-operation, privilege-withdrawn.
        #[arg(long, value_parser = parse_reason)]
        reason: keyfab_crypto::x509::CrlReason,
        /// Only the certificates a re-provisioning superseded (a returned unit's old
        /// identity), not the ones it holds now.
        #[arg(long)]
        superseded_only: bool,
    },
    /// Where a device came from, from verified audit data: site, entitlement, station,
    /// time, audit record and the checkpoint that covers it, its certificates and keys,
    /// and its status.
    #[command(after_help = "Example:\n  keyfab hq device show --home hq TSV2-00000042")]
    Show {
        #[command(flatten)]
        home: Home,
        /// The device id.
        device_id: String,
    },
}

/// `hq device revoke --reason`: an RFC 5280 reason by its name.
fn parse_reason(text: &str) -> Result<keyfab_crypto::x509::CrlReason, String> {
    use keyfab_crypto::x509::CrlReason;
    CrlReason::parse(text).ok_or_else(|| {
        format!(
            "'{text}' is not one of {}",
            CrlReason::ALL.map(CrlReason::as_str).join(", ")
        )
    })
}

#[derive(Subcommand, Debug)]
pub(crate) enum HqSiteCommand {
    /// Register a site from its identity file (it must chain to HQ's root, role site).
    #[command(after_help = "Example:\n  keyfab hq site add --home hq shenzhen-1.kfi")]
    Add {
        #[command(flatten)]
        home: Home,
        /// The site's identity file (.kfi).
        file: PathBuf,
    },
    /// List registered sites.
    List {
        #[command(flatten)]
        home: Home,
    },
    /// Reset a site's trusted time to HQ's time: a receipt the site imports with `site
    /// receipt import`. For a site whose clock ran ahead and whose trusted time followed
    /// it, so that it now answers clock_rollback. It acknowledges the site's export HQ
    /// imported last, and the site takes it only if no device received keys since.
    #[command(after_help = "Steps:
  keyfab site audit export --home site --out now.kfa          # at the site (stations stopped)
  keyfab hq audit import --home hq now.kfa                    # at HQ: see the times it recorded
  keyfab hq site reset-clock --home hq --site shenzhen-1 --out reset.kfk
  keyfab site receipt import --home site reset.kfk            # at the site, clock set right

HQ's time becomes the site's trusted time; the reset is recorded in the site's log
(clock_reset), and HQ accepts in the site's log only the resets it issued.")]
    ResetClock {
        #[command(flatten)]
        home: Home,
        /// The registered site.
        #[arg(long)]
        site: String,
        /// The receipt to write (a new file).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HqAuditCommand {
    /// Verify and import a site's audit bundle (.kfa), then re-check every decision
    /// against the policy. Refusals exit 4 (log_gap, log_fork, replayed, ...) and change
    /// nothing.
    #[command(
        after_help = "Example:\n  keyfab hq audit import --home hq shenzhen-1.kfa --receipt-out shenzhen-1.kfk"
    )]
    Import {
        #[command(flatten)]
        home: Home,
        /// The site's audit export (.kfa), as it came from the site.
        #[arg(value_name = "FILE.kfa")]
        file: PathBuf,
        /// Write HQ's signed acknowledgment for the site (import it there with
        /// `keyfab site receipt import`).
        #[arg(long, value_name = "FILE.kfk")]
        receipt_out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HqEntitlementCommand {
    /// Generate keys under a policy, encrypt them to the site, sign: a .kfe file.
    #[command(
        after_help = "Example:\n  keyfab hq entitlement create --home hq --site shenzhen-1 --policy policy.toml --out thermostat.kfe\n\nThe policy format is in README.md; every invalid field is refused by name and nothing is written."
    )]
    Create {
        #[command(flatten)]
        home: Home,
        /// The registered site the entitlement is for.
        #[arg(long)]
        site: String,
        /// The policy (policy.toml); approver key paths in it are relative to it.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Where to write the entitlement (.kfe).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List entitlements issued.
    List {
        #[command(flatten)]
        home: Home,
    },
    /// Revoke an entitlement: a signed .kfr for its site (import it with
    /// `keyfab site entitlement import`); the site then refuses with `revoked` and
    /// destroys the pool keys no device took.
    #[command(after_help = "Example:
  keyfab hq entitlement revoke --home hq --id ID --reason \"line closed\" --out ID.kfr")]
    Revoke {
        #[command(flatten)]
        home: Home,
        /// The entitlement to revoke (see `keyfab hq entitlement list`).
        #[arg(long)]
        id: String,
        /// Why, in words: it travels in the signed file and the site's audit.
        #[arg(long, default_value = "revoked by HQ")]
        reason: String,
        /// Where to write the revocation (.kfr).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteCommand {
    /// Create the site's state and its cluster CSR (HOME/cluster.csr).
    #[command(after_help = "Example:\n  keyfab site init --home site --name shenzhen-1")]
    Init(InitArgs),
    /// Install the cluster certificate the root issued; the site then issues its service keys.
    #[command(
        after_help = "Example:\n  keyfab site install-cert --home site --cert site.crt --root-cert root/root.crt"
    )]
    InstallCert(InstallCertArgs),
    /// The site's identity file for HQ.
    #[command(subcommand)]
    Identity(SiteIdentityCommand),
    /// Entitlements received from HQ.
    #[command(subcommand)]
    Entitlement(SiteEntitlementCommand),
    /// Show or change site settings (each change is audited).
    #[command(after_help = "Examples:
  keyfab site config --home site
  keyfab site config --home site --clock-tolerance 600
  keyfab site config --home site --clock-max-jump 2592000     # once, after a month-long shutdown

The site keeps a trusted time: the latest time it has recorded anything at. A clock
behind it (beyond --clock-tolerance) stops provisioning with clock_rollback; a clock
ahead of it by more than --clock-max-jump is not adopted: what would be recorded at
that time is refused with clock_ahead (and audited), so one clock set ahead by mistake
cannot move the trusted time years on and stop the site until then.")]
    Config {
        #[command(flatten)]
        home: Home,
        /// Seconds the clock may fall behind the trusted time before provisioning stops
        /// with clock_rollback (0 to 86400; default 300).
        #[arg(long)]
        clock_tolerance: Option<i64>,
        /// Seconds the clock may run ahead of the trusted time and be adopted; beyond,
        /// requests and commands are refused with clock_ahead (60 to 315360000; default
        /// 604800, a week).
        #[arg(long)]
        clock_max_jump: Option<i64>,
    },
    /// The site's audit log: verify it, write a signed checkpoint of it.
    #[command(subcommand)]
    Audit(SiteAuditCommand),
    /// HQ's receipts: acknowledgments of this site's audit.
    #[command(subcommand)]
    Receipt(SiteReceiptCommand),
    /// Quorum approvals: ask approvers, then submit what they signed.
    #[command(subcommand)]
    Approval(SiteApprovalCommand),
    /// Provision one device locally: decide under the policy, record, then release keys.
    #[command(after_help = "Examples:
  keyfab site provision --home site --entitlement ID --device-id TSV2-00000001 --station line-1 --out dev1.json
  keyfab site provision --home site --entitlement ID --device-ids lot-42.txt --station line-1 --out lot-42.jsonl\n  keyfab site provision --home site --entitlement ID --device-id TSV2-00000002 --csr dev2.csr --json\n\nRefusals exit 3 with the policy's code (quota_exceeded, daily_limit_exceeded, ...).\nA retry with the same --request-id returns the same keys and consumes nothing more.\nA lot (--device-ids) exits 0 only when every device has its keys; otherwise its summary\nnames each refused device with its code, and it exits with the code most of them got.\nRunning the same lot again resumes it.")]
    Provision(ProvisionArgs),
    /// The stations of the production line: enroll, revoke, list.
    #[command(subcommand)]
    Station(SiteStationCommand),
    /// The site on one screen: sealed or not, each entitlement (state, today against its
    /// limit, in all against its quota, window, audit due), the audit's freshness, the
    /// stations, the trusted time — and first, what will stop the line soon.
    #[command(
        after_help = "Examples:\n  keyfab site status --home site\n  keyfab --json site status --home site | jq .warnings\n\nWorks on a stopped site and on a serving one (through HOME/serve.sock, without the\npassphrase); a serving one adds each station's open connections, last request and\ndevices per second."
    )]
    Status {
        #[command(flatten)]
        home: Home,
    },
    /// Serve the station API (docs/openapi.json) over mutual TLS until SIGTERM or Ctrl-C.
    #[command(after_help = "Examples:
  keyfab site serve --home site --listen 127.0.0.1:8443
  keyfab site serve --home site --listen 0.0.0.0:8443 --hostname keyfab.line1.factory --hostname 10.0.4.2

Only stations enrolled with `keyfab site station enroll` get past the TLS handshake.
The address it listens on goes to stderr once it accepts connections. While it runs,
every other `keyfab site ...` command works as on a stopped site: it unlocks the
keystore itself and reaches the server's store through HOME/serve.sock (0600), so an
import, a revocation, an export or a station enrolled takes effect without stopping
the line. On SIGTERM the server stops accepting, lets requests in flight finish, and exits.
A home sealed by shares (site init --unseal-shares) starts sealed: it opens only
HOME/serve.sock, for `keyfab site unseal`, and serves stations once enough shares are in.")]
    Serve(ServeArgs),
    /// New service keys (signing, encryption) and certificates for the site, recorded in
    /// its audit log; the previous ones still open and verify what was sealed and signed
    /// with them.
    #[command(
        after_help = "Example:\n  keyfab site rotate-keys --home site\n  keyfab site identity export --home site --out shenzhen-1.kfi   # then, at HQ: keyfab hq site add"
    )]
    RotateKeys {
        #[command(flatten)]
        home: Home,
    },
    /// Give one unseal share to the sealed `site serve` running in HOME.
    #[command(after_help = "Examples:
  keyfab site unseal --home site --share-file alice.kfs --holder-key alice.key   # sealed to alice
  keyfab site unseal --home site                  # type or paste a share given in clear
  keyfab site unseal --home site --status

Each holder gives their own share; the node serves once the threshold is met. A
sealed share (init --share-recipients) opens only with its holder's key, unlocked by
the holder's passphrase (KEYFAB_PASSPHRASE or --passphrase-file). A share that is not
one of this site's, or sealed to another holder, is refused and changes nothing.")]
    Unseal {
        #[command(flatten)]
        home: Home,
        /// Read the share from this file: sealed (.kfs, with --holder-key) or in clear
        /// (default: standard input).
        #[arg(long, value_name = "FILE", conflicts_with = "status")]
        share_file: Option<PathBuf>,
        /// The holder's key (NAME.key from `keyfab holder keygen`) that opens a sealed
        /// share.
        #[arg(long, value_name = "FILE", requires = "share_file")]
        holder_key: Option<PathBuf>,
        /// Only show how many shares are in.
        #[arg(long)]
        status: bool,
    },
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub home: Home,
    /// Address and port to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// Host name or IP address stations use in their URL (it must resolve to this
    /// machine on theirs); repeat for several. The site's certificate holds these,
    /// `localhost` and the listen address (unless it is 0.0.0.0 or ::).
    #[arg(long = "hostname", value_name = "NAME")]
    pub hostnames: Vec<String>,
    /// Connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to finish the TLS handshake.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub handshake_timeout: u64,
    /// Seconds a client has to send a request's headers (a client that trickles bytes
    /// is cut off).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub header_timeout: u64,
    /// Seconds a request may take in all, its body included.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub request_timeout: u64,
    /// For a site bound to a TPM counter (`site init --rollback-counter`): while keys
    /// are released, advance the counter at most this often. A copy of the home taken
    /// between two advances is caught only from the next one on; each advance is one
    /// write to the TPM's NV memory, whose endurance is finite (docs/THREAT-MODEL.md).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub rollback_counter_every: u64,
    /// Connections one station may hold open; more are closed after the handshake.
    #[arg(long, default_value_t = 64)]
    pub per_station_connections: usize,
    /// Requests one station may have in flight; more are answered 429 busy (and sent
    /// again by the station). Twice a default `station run`'s programmers; raise it for
    /// a station driving more at once (a gang programmer). Lower keeps a flooding
    /// station's queue short: with 16, eight paced stations kept their rate and p99
    /// under a 150-connection flood (`keyfab bench serve --flood-station 150`).
    #[arg(long, default_value_t = 16)]
    pub per_station_requests: usize,
    /// Settings from a TOML file — listen, hostnames, metrics_listen, log_format,
    /// log_level, log_filter, max_connections, handshake_timeout, header_timeout,
    /// request_timeout, rollback_counter_every, per_station_connections,
    /// per_station_requests, named as these
    /// flags are — under the flags given on the command line. (The clock tolerance is a
    /// setting of the home, changed and audited by `site config`, not a file's to
    /// change.)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (the file and the flags) and print what `site serve`
    /// would use, without opening the home or listening.
    #[arg(long)]
    pub check_config: bool,
    /// The flags given on the command line, which a `--config` file does not override.
    #[arg(skip)]
    pub explicit: Vec<String>,
    /// Also serve `/metrics`, `/healthz/live` and `/healthz/ready` on plain HTTP at
    /// ADDR, without client certificates, for Prometheus and load balancers: keep it on
    /// loopback (127.0.0.1:9464) or a management network — it names the entitlements and
    /// how far each is, never a key. Ready: the store answers and the site has not
    /// stopped itself.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Logs on stderr: text, or json (one object per line, for a log collector).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// warn: problems only; info: also one line per request; debug: also one line per
    /// decision (released, or refused with its code; the audit log has them all anyway).
    /// The level of keyfab's own logs: the libraries under it (TLS, HTTP, the etcd
    /// client's gRPC) log at info at most, unless --log-filter says otherwise.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Levels per log target, instead of --log-level: `target=level` pairs and a bare
    /// level for every other target, separated by commas (levels: off, error, warn,
    /// info, debug, trace). keyfab's targets: keyfab::access (one line per request),
    /// keyfab::provision (decisions), keyfab::tls, keyfab::entitlement, keyfab::unseal;
    /// the libraries' are their crate names (rustls, h2, tonic). Default: RUST_LOG when
    /// set.
    #[arg(long, value_name = "SPEC", value_parser = log_filter)]
    pub log_filter: Option<String>,
}

/// A `--log-filter` (or `RUST_LOG`) specification that parses.
pub(crate) fn log_filter(text: &str) -> Result<String, String> {
    text.parse::<tracing_subscriber::filter::Targets>()
        .map(|_| text.to_owned())
        .map_err(|e| format!("'{text}': {e} (e.g. keyfab=debug,h2=warn,info)"))
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteStationCommand {
    /// Enroll a station: writes its key (station.key, mode 0600), its certificate
    /// (station.crt) and the site's line CA (line-ca.crt) into DIR. Copy DIR to the station.
    #[command(
        after_help = "Example:\n  keyfab site station enroll --home site --name line-1 --out line-1/"
    )]
    Enroll {
        #[command(flatten)]
        home: Home,
        /// The station's name: 1-64 of a-z 0-9 . _ - (the certificate's CN, and the
        /// `station` of every decision it asks for).
        #[arg(long)]
        name: String,
        /// A new directory for the station's files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Renew a station's certificate before it ends, without revoking the station: a
    /// new key and certificate into DIR. The current certificate keeps working until its
    /// own end, so the station swaps its files when the line allows. (A station whose
    /// key may have leaked is revoked, not renewed.)
    #[command(
        after_help = "Example:\n  keyfab site station renew --home site --name line-1 --out line-1-renewed/ --days 365"
    )]
    Renew {
        #[command(flatten)]
        home: Home,
        /// The station to renew (see `keyfab site station list`).
        #[arg(long)]
        name: String,
        /// A new directory for the station's new files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the new certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Revoke a station: its certificate opens no new connection, and requests on open
    /// ones are refused.
    #[command(after_help = "Example:\n  keyfab site station revoke --home site --name line-1")]
    Revoke {
        #[command(flatten)]
        home: Home,
        /// The station to revoke (see `keyfab site station list`).
        #[arg(long)]
        name: String,
    },
    /// List the stations, enrolled and revoked.
    List {
        #[command(flatten)]
        home: Home,
    },
}

/// Where a station finds its site, and who it is.
#[derive(Args, Debug)]
pub(crate) struct StationArgs {
    /// The site's URL; several, comma-separated, are tried in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    pub url: Vec<String>,
    /// The directory `keyfab site station enroll` wrote.
    #[arg(long, value_name = "DIR")]
    pub station_dir: PathBuf,
    /// How many times a request is sent in all, over all URLs, while no site answers or
    /// the site's store is unavailable (with waits that grow to a few seconds), before
    /// the command gives up (1–200). Every attempt carries the same request id.
    #[arg(long, value_name = "N", default_value_t = keyfab_station::DEFAULT_ATTEMPTS,
          value_parser = attempts)]
    pub attempts: usize,
}

#[derive(Subcommand, Debug)]
pub(crate) enum StationCommand {
    /// Run a simulated production line: N devices, each a chip with its own transport
    /// key; each gets its keys sealed to its chip, opens them, checks its certificates
    /// against the root, and confirms.
    #[command(after_help = "Example:
  keyfab station run --url https://127.0.0.1:8443 --station-dir line-1 --root-cert root/root.crt \\
      --entitlement ID --devices 1000 --concurrency 16 --device-prefix TSV2-

Device ids are PREFIX followed by 8 digits from --first. Each device's request id and its
simulated chip's transport key are derived from the station's key, so running the same
line again resumes where it stopped: keys released and not yet confirmed are answered
again and programmed, devices confirmed by an earlier run are counted as done
(`already_programmed`, `already_failed`), refusals that pass with time (the daily limit,
the quota, the window, an approval, an audit receipt) are decided again. A request
answered `busy` (more in flight than the site allows one station) or whose connection
failed is sent again with the same request id; the summary counts them (JSON `retried`).

Exit status: 0 when every device is done (programmed now or by an earlier run, or
confirmed failed); otherwise the code most of the devices not done got (exit 3 for a
refusal such as `daily_limit_exceeded`, 1 for `unreachable`), after the same summary
(with --json: the summary with an `error` member).")]
    Run {
        #[command(flatten)]
        station: StationArgs,
        /// The root certificate devices check their certificates against.
        #[arg(long, value_name = "FILE")]
        root_cert: PathBuf,
        /// The entitlement the line provisions under.
        #[arg(long)]
        entitlement: String,
        /// How many devices.
        #[arg(long)]
        devices: u64,
        /// Devices in flight at once: programmers, each on a thread of its own (1–1024).
        #[arg(long, default_value_t = 8, value_parser = programmers)]
        concurrency: usize,
        /// Device ids: this prefix, then 8 digits.
        #[arg(long, default_value = "SIM-")]
        device_prefix: String,
        /// The number of the first device.
        #[arg(long, default_value_t = 1)]
        first: u64,
        /// Append one JSON line per device to FILE (created 0600): device id, request
        /// id, result, the site's code or the reason, the audit record and node of the
        /// decision, the URL that answered — to reconcile the line with the site's audit.
        #[arg(long, value_name = "FILE")]
        device_log: Option<PathBuf>,
        /// Simulate chips certified by the drill chip vendor in DIR (`keyfab pki
        /// init-chip-vendor`): each chip's transport key gets the vendor's certificate
        /// (the chip's serial is its device id), and each request carries that chain,
        /// for a policy whose `[chips]` requires attestation.
        #[arg(long, value_name = "DIR")]
        chip_vendor: Option<PathBuf>,
    },
    /// Tell the site a device was programmed, or that programming failed (its keys are
    /// then burned). Either way the keys are never handed out again.
    #[command(after_help = "Examples:
  keyfab station confirm --url https://127.0.0.1:8443 --station-dir line-1 --entitlement ID --device-id TSV2-00000001 --result programmed
  keyfab station confirm --url https://127.0.0.1:8443 --station-dir line-1 --entitlement ID --device-id TSV2-00000002 --result failed")]
    Confirm {
        #[command(flatten)]
        station: StationArgs,
        /// The entitlement the device's keys came from.
        #[arg(long)]
        entitlement: String,
        /// The device programmed (or not).
        #[arg(long)]
        device_id: String,
        /// programmed, or failed.
        #[arg(long, value_enum)]
        result: Programming,
    },
    /// Provision one device through a site's station API.
    #[command(after_help = "Examples:
  keyfab station provision --url https://127.0.0.1:8443 --station-dir line-1 --entitlement ID --device-id TSV2-00000001
  keyfab station provision --url https://a:8443,https://b:8443 --station-dir line-1 --entitlement ID --device-id TSV2-00000002 --out dev2.json

A dropped connection is retried with the same request id (on the next URL, if several),
so a retry never takes a second key. Refusals exit 3 with the policy's code.")]
    Provision {
        #[command(flatten)]
        station: StationArgs,
        /// The entitlement id (see GET /v1/entitlements).
        #[arg(long)]
        entitlement: String,
        /// The device's id; the policy's id_pattern must match it.
        #[arg(long)]
        device_id: String,
        /// Makes retries idempotent (default: a fresh random id).
        #[arg(long)]
        request_id: Option<String>,
        /// The device's CSR (PEM), for keys with source `device`.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        #[command(flatten)]
        chip: ChipArgs,
        /// Write the key material and certificates (JSON, mode 0600) to FILE, a new file,
        /// instead of standard output: one that exists, or in a directory that does not,
        /// is refused before the site is asked. If the answer cannot be written, or
        /// never arrives, the error gives the request id and the command that gets the
        /// same keys again.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteAuditCommand {
    /// Check the hash chain of the whole log and print its size and Merkle root.
    #[command(after_help = "Example:
  keyfab site audit verify --home site")]
    Verify {
        #[command(flatten)]
        home: Home,
    },
    /// Export the records since the last export for HQ (.kfa): signed by the site,
    /// encrypted to HQ, with the checkpoint and a consistency proof.
    #[command(
        after_help = "Examples:\n  keyfab site audit export --home site --out shenzhen-1-2026-11-25.kfa\n  keyfab site audit export --home site --again --out retry.kfa   # the last range once more"
    )]
    Export {
        #[command(flatten)]
        home: Home,
        /// Where to write the export (a new file, 0600), for HQ.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Write the last exported range again (if the file was lost).
        #[arg(long)]
        again: bool,
    },
    /// Write a checkpoint of the log (size, RFC 9162 root, time) signed by the site.
    #[command(after_help = "Example:
  keyfab site audit checkpoint --home site --out now.kfc")]
    Checkpoint {
        #[command(flatten)]
        home: Home,
        /// Where to write the signed checkpoint (a new file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteReceiptCommand {
    /// Import HQ's signed acknowledgment of this site's audit (.kfk). Its checkpoint must
    /// still be in the log (otherwise: rollback_detected); it restarts the
    /// audit_every_days clock.
    #[command(after_help = "Example:
  keyfab site receipt import --home site hq-receipt.kfk")]
    Import {
        #[command(flatten)]
        home: Home,
        /// HQ's receipt (.kfk), from `keyfab hq audit import --receipt-out`.
        #[arg(value_name = "FILE.kfk")]
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteApprovalCommand {
    /// Write an approval request for approvers to sign (`keyfab approver sign`). The
    /// request is signed by the site and summarises what it approves.
    #[command(after_help = "Examples:
  keyfab site approval request --home site --entitlement ID --action activate --out activate.req
  # 500 devices a day instead of the policy's limits.daily, on two policy days
  # (dates in the policy's time zone; the quota itself stays as HQ set it):
  keyfab site approval request --home site --entitlement ID --action raise-limit \\
      --daily 500 --from-day 2026-12-08 --to-day 2026-12-09 --out raise.req
  # A returned unit gets new keys and a new certificate, once; its earlier keys are
  # burned (it counts against the quota again: new keys are a new identity):
  keyfab site approval request --home site --entitlement ID --action reprovision \\
      --device-id TSV2-00000042 --reason \"RMA 7781: chip replaced\" --out rma.req")]
    Request {
        #[command(flatten)]
        home: Home,
        /// The entitlement the action is for (see `keyfab site entitlement list`).
        #[arg(long)]
        entitlement: String,
        /// activate, raise-limit or reprovision (as the policy's required_for lists).
        #[arg(long, value_enum)]
        action: ApprovalAction,
        /// reprovision: the device, already provisioned under the entitlement, that gets
        /// new keys once.
        #[arg(long, value_name = "ID", required_if_eq("action", "reprovision"))]
        device_id: Option<String>,
        /// reprovision: why, for the approvers and the audit (at most 256 characters).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// raise-limit: the daily limit on the days raised, above the policy's and at
        /// most the quota.
        #[arg(long, value_name = "N", required_if_eq("action", "raise-limit"))]
        daily: Option<u64>,
        /// raise-limit: the first policy day raised (YYYY-MM-DD, policy time zone).
        #[arg(
            long,
            value_name = "YYYY-MM-DD",
            required_if_eq("action", "raise-limit")
        )]
        from_day: Option<String>,
        /// raise-limit: the last policy day raised (inclusive; at most 31 days).
        #[arg(
            long,
            value_name = "YYYY-MM-DD",
            required_if_eq("action", "raise-limit")
        )]
        to_day: Option<String>,
        /// Where to write the request, for the approvers to sign.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How long approvers have to sign.
        #[arg(long, default_value_t = 72)]
        expires_in_hours: i64,
    },
    /// Submit signed approvals; when distinct listed approvers reach the threshold, the
    /// action takes effect. One bad approval refuses the lot (exit 4, approval_invalid).
    #[command(
        after_help = "Example:\n  keyfab site approval submit --home site alice.approval bob.approval"
    )]
    Submit {
        #[command(flatten)]
        home: Home,
        /// The approvers' signed files (`keyfab approver sign`), one or more.
        #[arg(required = true, value_name = "FILE.approval")]
        approvals: Vec<PathBuf>,
    },
}

/// What a request says of the chip it is for.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ChipArgs {
    /// The chip's transport key: a P-256 public key, PEM (`PUBLIC KEY`, as `openssl ec
    /// -pubout` writes it). The keys come back sealed to it: only the chip opens them.
    #[arg(long, value_name = "FILE")]
    pub transport_key: Option<PathBuf>,
    /// The chip's certificate chain as the chip gives it, leaf first (PEM, or DER
    /// certificates one after another): under a policy's `[chips]`, the proof that the
    /// transport key (or the CSR's key) is a chip's. A retry must send the same.
    #[arg(long, value_name = "FILE")]
    pub chip_chain: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ProvisionArgs {
    #[command(flatten)]
    pub home: Home,
    /// The entitlement id (see `keyfab site entitlement list`).
    #[arg(long)]
    pub entitlement: String,
    /// The device's id; the policy's id_pattern must match it.
    #[arg(
        long,
        required_unless_present = "device_ids",
        conflicts_with = "device_ids"
    )]
    pub device_id: Option<String>,
    /// Provision every device id in FILE (one per line), writing one JSON line per
    /// device to --out as soon as its keys are released. Running the same file into the
    /// same --out again after an interruption resumes: devices already in the file are
    /// not written again, and one whose line was cut short is written again whole.
    #[arg(long, value_name = "FILE", requires = "out")]
    pub device_ids: Option<PathBuf>,
    /// The station asking, checked against the policy's `[stations] allowed`.
    #[arg(long)]
    pub station: Option<String>,
    /// Makes retries idempotent (default: a fresh random id).
    #[arg(long)]
    pub request_id: Option<String>,
    /// The device's CSR (PEM or DER), for keys with source `device`.
    #[arg(long, value_name = "FILE")]
    pub csr: Option<PathBuf>,
    #[command(flatten)]
    pub chip: ChipArgs,
    /// Write the key material and certificates (JSON, mode 0600) to FILE, a new file:
    /// one that exists, or in a directory that does not, is refused before any key is
    /// released. If writing fails after the release, the error gives the request id and
    /// the command that gets the same keys again.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteIdentityCommand {
    /// Write the signed site identity (.kfi) that HQ registers with `hq site add`.
    #[command(
        after_help = "Example:\n  keyfab site identity export --home site --out shenzhen-1.kfi"
    )]
    Export {
        #[command(flatten)]
        home: Home,
        /// Where to write the identity file (.kfi).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SiteEntitlementCommand {
    /// Verify and import an entitlement (.kfe) or a revocation (.kfr). Refusals exit 4
    /// and change nothing.
    #[command(
        after_help = "Example:\n  keyfab site entitlement import --home site thermostat.kfe"
    )]
    Import {
        #[command(flatten)]
        home: Home,
        /// The entitlement file (.kfe) from HQ.
        file: PathBuf,
    },
    /// List imported entitlements: their policy, key counts and devices provisioned (on a cluster, also the quota nodes hold in reserve).
    #[command(after_help = "Example:\n  keyfab site entitlement list --home site --json")]
    List {
        #[command(flatten)]
        home: Home,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HolderCommand {
    /// Create a share holder's key pair: NAME.key (private, sealed under your passphrase,
    /// mode 0600) and NAME.pub, which `init --share-recipients` seals a share to.
    #[command(
        after_help = "Example:\n  KEYFAB_PASSPHRASE=... keyfab holder keygen --out alice   # alice.key, alice.pub\n  keyfab site init --home site --name shenzhen-1 --unseal-shares 3 --unseal-threshold 2 \\\n      --share-recipients alice.pub,bob.pub,carol.pub --shares-out shares/\n\nNAME.key is sealed under the passphrase (KEYFAB_PASSPHRASE or --passphrase-file)\nwith Argon2id and AES-256-GCM, as a node's keystore is."
    )]
    Keygen {
        /// Path and name of the key pair, without extension: NAME.key and NAME.pub.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// Read the passphrase that seals the key from this file instead of
        /// KEYFAB_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Open your sealed share and write its text where you say: for commands run while
    /// the home is stopped (--unseal-share-file), never to a terminal.
    #[command(
        after_help = "Example:\n  keyfab site identity export --home site --out site.kfi \\\n      --unseal-share-file <(keyfab holder open-share --key alice.key alice.kfs) \\\n      --unseal-share-file <(keyfab holder open-share --key bob.key bob.kfs --passphrase-file bob.pass)\n\nThe share goes to standard output only when that is a pipe or a file; to show it on\na screen is refused. A running `site serve` takes the sealed file itself:\n`keyfab site unseal --share-file alice.kfs --holder-key alice.key`."
    )]
    OpenShare {
        /// Your key (NAME.key from `keyfab holder keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The sealed share (.kfs) from `init --share-recipients`.
        file: PathBuf,
        /// Read your key's passphrase from this file instead of KEYFAB_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ApproverCommand {
    /// Check an approval request (signed by the site, up to the root), show what it
    /// approves, and sign it with your key once you confirm.
    #[command(
        after_help = "Examples:\n  keyfab approver sign --key alice.key --root-cert root.crt activate.req --out alice.approval\n  keyfab approver sign --key alice.key --root-cert root.crt activate.req --out alice.approval --yes\n\nThe summary (site, entitlement, product, quota, daily limit, window, stations,\naction, expiry) goes to the terminal, which is asked to confirm; without a terminal,\n--yes says you have read it (the output repeats it). A request not signed by a site\nunder the root, or expired, is refused and nothing is written."
    )]
    Sign {
        /// Your private key (NAME.key from `keyfab approver keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The root CA's certificate (PEM): the site that signed the request must be
        /// certified under it.
        #[arg(long, value_name = "FILE")]
        root_cert: PathBuf,
        /// The request from `keyfab site approval request`.
        request: PathBuf,
        /// Where to write your approval, for the site to submit.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Sign without asking: for scripts, by someone who has read the summary.
        #[arg(long)]
        yes: bool,
        /// Read your key's passphrase from this file instead of KEYFAB_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Create an approver key pair: NAME.key (private, sealed under your passphrase,
    /// mode 0600) and NAME.pub.
    #[command(
        after_help = "Examples:\n  KEYFAB_PASSPHRASE=... keyfab approver keygen --out alice   # alice.key, alice.pub\n  keyfab approver keygen --out drill --no-passphrase          # a drill's key, in clear\n\nList alice.pub under [approval] approvers in policy.toml. NAME.key is sealed under\nthe passphrase (KEYFAB_PASSPHRASE or --passphrase-file) with Argon2id and AES-256-GCM,\nas a node's keystore is; `approver sign` asks for the same passphrase."
    )]
    Keygen {
        /// Path and name of the key pair, without extension: NAME.key and NAME.pub.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// Write the private key in clear (PKCS#8 PEM): for drills and tests only.
        #[arg(long)]
        no_passphrase: bool,
        /// Read the passphrase that seals the key from this file instead of
        /// KEYFAB_PASSPHRASE.
        #[arg(long, value_name = "FILE", conflicts_with = "no_passphrase")]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Run a policy module against recorded cases, in order, before HQ signs it.
    ///
    /// The cases simulate one entitlement: allowed devices count toward the totals, the
    /// per-station and per-day counters and the module's own state, as at a site; the
    /// built-in quota and daily limit apply first. The module is checked as HQ checks it
    /// (no floats, only the keyfab host API, `decide` and `memory` exported).
    #[command(
        after_help = "Example:\n  keyfab policy test --module examples/policies/shift-limit/shift-limit.wasm \\\n      --cases examples/policies/shift-limit/cases.json\n  keyfab policy test --module rules.wat --cases cases.json --json\n\nA cases file (JSON):\n  {\"timezone\": \"Asia/Shanghai\", \"devices\": 10000, \"daily\": 2000,\n   \"cases\": [\n     {\"at\": \"2026-11-25T08:00:00+08:00\", \"station\": \"line-1\", \"repeat\": 500, \"expect\": \"allow\"},\n     {\"at\": \"2026-11-25T13:59:59+08:00\", \"expect\": \"policy_denied\", \"reason\": \"shift\"},\n     {\"at\": \"2026-11-25T14:00:00+08:00\", \"confirm\": \"failed\", \"repeat\": 2}]}\n\nSee docs/POLICY-CODE.md. Exit 0 when every case holds, 1 otherwise."
    )]
    Test {
        /// The module: a .wasm file, or .wat (WebAssembly text).
        #[arg(long, value_name = "FILE")]
        module: PathBuf,
        /// The cases (JSON).
        #[arg(long, value_name = "FILE")]
        cases: PathBuf,
    },
}

#[cfg(feature = "bench")]
#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// HQ's audit import (verify + reconcile) of an N-record bundle signed by a real
    /// site, in a child process, against the SHA-256 chain rate of this machine.
    #[command(
        after_help = "Example:\n  keyfab bench audit --records 1000000 --json\n  keyfab bench audit --records 1000000 --random-ids   # device ids that share no prefix"
    )]
    Audit {
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Device ids that share no prefix (random hex) instead of serial numbers: HQ's
        /// device index groups serials by prefix, so this is its slowest case.
        #[arg(long)]
        random_ids: bool,
        /// Keep the files in DIR, with HQ's home before the import in DIR/hq-before-import.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Provision devices through the real decide-and-record path (durable commits), with
    /// a site-generated key (ec-p256 unless --key-type) and a device certificate each; compare with the raw
    /// per-device crypto rate of this machine. Each level also reports where the CPU went
    /// (the committer, the crypto workers, the rest, per device), how busy the cores
    /// were, and — on the embedded store — the rate those costs would allow with every
    /// core busy (below it, the level waited on commits; at it, the CPU is the limit).
    #[command(
        after_help = "Examples:\n  keyfab bench provision                  # concurrency 1, 8 and 64, 3 s each\n  keyfab bench provision --concurrency 64 --devices 20000 --json\n  keyfab bench provision --custody pkcs11  # HQ and site keys in SoftHSM2, against an HSM-centred baseline\n  keyfab bench provision --concurrency 64 --policy-module examples/policies/failure-pause/rules.wat\n  keyfab bench provision --store etcd --nodes 2 --concurrency 64  # a 3-member etcd cluster on loopback\n  keyfab bench provision --key-source hq-pool --concurrency 64    # keys from HQ's pool\n  keyfab bench provision --key-type ec-p384 --concurrency 64       # or rsa-2048, rsa-3072, ed25519"
    )]
    Provision {
        /// Concurrent requests (default: 1, 8 and 64 in turn).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Devices per concurrency level (instead of a time per level).
        #[arg(long, conflicts_with = "seconds", value_parser = clap::value_parser!(u64).range(1..))]
        devices: Option<u64>,
        /// Seconds per concurrency level (used unless --devices is given). A level must
        /// last long enough that its p99 is not one moment's events: at 10,000 devices
        /// the concurrency-64 level is over in 0.3 s, and its p99 moved by 1–2 ms from
        /// one run to the next.
        #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
        seconds: f64,
        /// Keep the files in DIR.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where HQ's and the site's identity keys live: software, or pkcs11 (fresh
        /// tokens of --pkcs11-module; SOFTHSM2_CONF is set up in DIR unless given).
        #[arg(long, default_value = "software", value_parser = ["software", "pkcs11"])]
        custody: String,
        /// The PKCS#11 module for --custody pkcs11.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/usr/lib/softhsm/libsofthsm2.so"
        )]
        pkcs11_module: PathBuf,
        /// A policy module (.wasm or .wat): every level also runs an entitlement with it,
        /// and the module's cost per evaluation is measured.
        #[arg(long, value_name = "FILE")]
        policy_module: Option<PathBuf>,
        /// Where the site keeps its state: `embedded`, `etcd` (three etcd members on
        /// loopback, started for the run), or `etcd://HOST:PORT,...` (a cluster you run).
        /// With etcd the run also reports consensus rounds per device.
        #[arg(long, value_name = "SPEC", default_value = "embedded")]
        store: String,
        /// Site nodes sharing the store (copies of the site's home), the callers spread
        /// over them.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Where the device keys come from: `site` (generated per device, on the crypto
        /// workers) or `hq-pool` (made by HQ, imported, taken slot by slot as decided).
        #[arg(long, value_name = "SOURCE", default_value = "site", value_parser = ["site", "hq-pool"])]
        key_source: String,
        /// The device key's type; the limit is that type's raw key generation (RSA is
        /// slow by nature: the ratio says how close keyfab comes to it).
        #[arg(long, value_name = "TYPE", default_value = "ec-p256", value_parser = ["ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-3072"])]
        key_type: String,
        /// Every level also runs an entitlement whose `[chips]` requires attestation, in
        /// turns with one without: each request of both carries a simulated chip's
        /// transport key (the keys are sealed to it), the attested one its vendor
        /// certificate chain as well, which the site verifies and records.
        #[arg(long, conflicts_with = "policy_module")]
        chip_attestation: bool,
        /// Bind the bench site to a TPM counter in a TPM simulator started for the run
        /// (`swtpm`), and run every level also with the counter advancing every
        /// --rollback-counter-every seconds, in turns with runs without advances.
        #[arg(long, value_name = "TPM", value_parser = ["swtpm"], conflicts_with_all = ["policy_module", "chip_attestation", "store"])]
        rollback_counter: Option<String>,
        /// With --rollback-counter: seconds between advances during the runs with it
        /// (`site serve` advances at most every 60 s by default; 1 is a harsher test).
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 1,
            requires = "rollback_counter"
        )]
        rollback_counter_every: u64,
    },
    /// The whole production-line path: `site serve` in its own process, stations over
    /// mutual TLS, keys sealed to each chip, opened, checked and confirmed; compare with
    /// the raw per-device crypto rate of this machine. For reference it then times bare
    /// `GET /healthz` requests over the same connections: the cost of TLS and HTTP alone.
    #[command(
        after_help = "Examples:\n  keyfab bench serve --stations 32 --devices 20000 --json\n  keyfab bench serve --stations 32 --devices 5000 --chip\n  keyfab bench serve --stations 64 --devices 20000 --chip-attestation\n  keyfab bench serve --flood-station 150\n\nWith --flood-station N, paced stations (--paced-stations, each asking --paced-rate\ndevices/s, as a line does) run for --seconds alone, then again while one more station\nfloods the site from N connections: their rate and p99 with and without the flood,\nand the ratio (goal: ≥ 0.9 of the rate, p99 ≤ 3×)."
    )]
    Serve {
        /// Stations (devices in flight) at once, each on a thread of its own (1–1024).
        #[arg(long, default_value_t = 32, value_parser = programmers)]
        stations: usize,
        #[arg(long, default_value_t = 10_000)]
        devices: u64,
        /// The whole line per device: keys sealed to a simulated chip, opened and checked
        /// on it, then confirmed (two requests, and the chip's work in this process).
        #[arg(long)]
        chip: bool,
        /// Measure what chip attestation costs: the whole line (as --chip) for an
        /// entitlement without `[chips]` and one that requires attestation, in alternating
        /// rounds of --devices / 2 each, every chip certified by a drill vendor first.
        #[arg(long)]
        chip_attestation: bool,
        /// Measure fairness instead: one station floods from N connections (1–1024)
        /// while paced stations work; --stations, --devices and --chip do not apply.
        #[arg(long, value_name = "N", value_parser = programmers, conflicts_with_all = ["chip", "chip_attestation"])]
        flood_station: Option<usize>,
        /// With --flood-station: how many paced stations (1–1024).
        #[arg(long, default_value_t = 8, value_parser = programmers)]
        paced_stations: usize,
        /// With --flood-station: devices per second each paced station asks for.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        paced_rate: u32,
        /// With --flood-station: seconds each paced run lasts.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Keep the files in DIR.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Create and import an N-device entitlement of hq-pool ec-p256 keys; compare with the
    /// raw P-256 key generation rate of this machine.
    #[command(after_help = "Example:\n  keyfab bench entitlement --devices 1000000 --json")]
    Entitlement {
        #[arg(long, default_value_t = 100_000)]
        devices: u64,
        /// Keep the files in DIR.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Most programmers a simulated line runs at once: each is a thread of its own.
const MAX_PROGRAMMERS: usize = 1024;

/// A number of programmers (stations, devices in flight) for a simulated line: 1 to
/// [`MAX_PROGRAMMERS`].
fn programmers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PROGRAMMERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number from 1 to {MAX_PROGRAMMERS}"
        )),
    }
}

fn attempts(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=keyfab_station::MAX_ATTEMPTS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number from 1 to {}",
            keyfab_station::MAX_ATTEMPTS
        )),
    }
}

/// A duration in seconds for `--seconds`: finite and above zero.
#[cfg(feature = "bench")]
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

/// What a cluster certificate lets its cluster act as (`pki issue --role`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CertRole {
    Hq,
    Site,
}

/// `--days N` or `--days forever`.
fn parse_lifetime(text: &str) -> Result<Lifetime, String> {
    if text == "forever" {
        return Ok(Lifetime::Forever);
    }
    match text.parse::<u32>() {
        Ok(d) if d >= 1 => Ok(Lifetime::Days(d)),
        _ => Err(format!(
            "'{text}' is not a number of days (1 to {}) or \"forever\"",
            u32::MAX
        )),
    }
}

impl CertRole {
    /// How long a cluster certificate of this role lasts unless `--days` says.
    pub(crate) fn default_days(self) -> Lifetime {
        match self {
            CertRole::Hq => Lifetime::Forever,
            CertRole::Site => Lifetime::Days(1825),
        }
    }

    pub(crate) fn role(self) -> keyfab_crypto::x509::Role {
        match self {
            CertRole::Hq => keyfab_crypto::x509::Role::Hq,
            CertRole::Site => keyfab_crypto::x509::Role::Site,
        }
    }
}

/// How `hq report` writes the report.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReportFormat {
    Text,
    Json,
    Html,
}

impl ReportFormat {
    /// The name `--format` takes.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReportFormat::Text => "text",
            ReportFormat::Json => "json",
            ReportFormat::Html => "html",
        }
    }
}

/// How `hq manifest` writes the devices.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ManifestFormat {
    Csv,
    Json,
    AwsIot,
}

impl ManifestFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ManifestFormat::Csv => "csv",
            ManifestFormat::Json => "json",
            ManifestFormat::AwsIot => "aws-iot",
        }
    }
}

/// How `site serve` writes its log lines.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// How much `site serve` logs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogLevel {
    Warn,
    Info,
    Debug,
}

/// What programming a device did (`station confirm --result`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Programming {
    Programmed,
    Failed,
}

impl Programming {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Programming::Programmed => "programmed",
            Programming::Failed => "failed",
        }
    }
}

/// What an approval request asks approvers to allow.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApprovalAction {
    Activate,
    RaiseLimit,
    Reprovision,
}

//! `certs`: the operator's tool for a peercam deployment CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use peercam_certs::{
    ca::{csr_identity_pem, CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS},
    files,
    inspect::format_time,
    make_csr, Ca, Identity, LeafSpec, Role,
};

/// Create a peercam deployment CA and issue certificates for rendezvous servers, cameras and
/// viewers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new deployment CA (DIR/ca.pem and DIR/ca.key). Keep ca.key offline.
    Ca {
        /// Directory to write ca.pem and ca.key into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Name shown in the CA certificate.
        #[arg(long, default_value = "peercam deployment CA")]
        name: String,
        /// Lifetime in days.
        #[arg(long, default_value_t = CA_VALIDITY_DAYS)]
        days: i64,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate and a new key for a rendezvous, camera or viewer.
    Issue {
        #[command(flatten)]
        ca: CaArgs,
        /// rendezvous, camera or viewer.
        #[arg(long)]
        role: Role,
        /// The holder's ID, e.g. cam-7 or alice-laptop.
        #[arg(long)]
        id: String,
        /// DNS name the rendezvous is reached by (repeatable; rendezvous only).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address the rendezvous is reached by (repeatable; rendezvous only).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Lifetime in days.
        #[arg(long, default_value_t = LEAF_VALIDITY_DAYS)]
        days: i64,
        /// Directory for <role>-<id>.pem and <role>-<id>.key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create a key and a CSR on the device; send only the CSR to the CA.
    Csr {
        /// camera or viewer.
        #[arg(long)]
        role: Role,
        /// The device's ID.
        #[arg(long)]
        id: String,
        /// Where to write the private key (mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the CSR.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a CSR: the device keeps its private key.
    SignCsr {
        #[command(flatten)]
        ca: CaArgs,
        /// The CSR file.
        #[arg(long)]
        csr: PathBuf,
        /// Role to certify (default: the one the CSR asks for).
        #[arg(long)]
        role: Option<Role>,
        /// ID to certify (default: the one the CSR asks for).
        #[arg(long)]
        id: Option<String>,
        /// Lifetime in days.
        #[arg(long, default_value_t = LEAF_VALIDITY_DAYS)]
        days: i64,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Show a certificate's role, ID, validity and fingerprints.
    Inspect {
        /// A PEM certificate.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct CaArgs {
    /// The CA certificate.
    #[arg(long, default_value = "ca.pem")]
    ca: PathBuf,
    /// The CA private key.
    #[arg(long, default_value = "ca.key")]
    ca_key: PathBuf,
}

impl CaArgs {
    fn load(&self) -> Result<Ca> {
        let cert = files::read_text(&self.ca, "the CA certificate")?;
        let key = files::read_text(&self.ca_key, "the CA private key")?;
        Ca::from_pem(&cert, &key).with_context(|| {
            format!(
                "cannot use {} with {} as the CA",
                self.ca.display(),
                self.ca_key.display()
            )
        })
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn validity(days: i64) -> Result<Option<time::OffsetDateTime>> {
    if days <= 0 {
        bail!("--days must be at least 1 (got {days})");
    }
    Ok(Some(
        time::OffsetDateTime::now_utc() + time::Duration::days(days),
    ))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ca {
            out,
            name,
            days,
            force,
        } => {
            validity(days)?;
            let (ca, key) = Ca::generate(&name, days)?;
            files::write_private(&out.join("ca.key"), &key, force)?;
            files::write_public(&out.join("ca.pem"), ca.cert_pem(), force)?;
            println!(
                "wrote {0}/ca.pem and {0}/ca.key (keep ca.key offline)",
                out.display()
            );
        }
        Command::Issue {
            ca,
            role,
            id,
            dns,
            ip,
            days,
            out,
            force,
        } => {
            let ca = ca.load()?;
            let mut spec = LeafSpec::new(Identity::new(role, &id)?);
            spec.dns_names = dns;
            spec.ips = ip;
            spec.not_after = validity(days)?;
            let issued = ca.issue(&spec)?;
            let base = out.join(format!("{role}-{id}"));
            let (cert, key) = (base.with_extension("pem"), base.with_extension("key"));
            files::write_private(&key, &issued.key_pem, force)?;
            files::write_public(&cert, &issued.cert_pem, force)?;
            println!(
                "issued {} {id}: {} and {}",
                role,
                cert.display(),
                key.display()
            );
        }
        Command::Csr {
            role,
            id,
            key,
            out,
            force,
        } => {
            let made = make_csr(&Identity::new(role, &id)?)?;
            files::write_private(&key, &made.key_pem, force)?;
            files::write_public(&out, &made.cert_pem, force)?;
            println!(
                "wrote {} (send it to your CA) and {} (keep it here)",
                out.display(),
                key.display()
            );
        }
        Command::SignCsr {
            ca,
            csr,
            role,
            id,
            days,
            out,
            force,
        } => {
            let ca = ca.load()?;
            let csr_pem = files::read_text(&csr, "the CSR")?;
            let asked =
                csr_identity_pem(&csr_pem).with_context(|| format!("reading {}", csr.display()))?;
            let identity = match (role, id, asked) {
                (Some(r), Some(i), _) => Identity::new(r, &i)?,
                (None, None, Some(a)) => a,
                (r, i, Some(a)) => Identity::new(r.unwrap_or(a.role), &i.unwrap_or(a.id))?,
                (_, _, None) => bail!(
                    "{} names no peercam identity: pass --role and --id",
                    csr.display()
                ),
            };
            let mut spec = LeafSpec::new(identity.clone());
            spec.not_after = validity(days)?;
            let cert = ca.sign_csr(&csr_pem, &spec)?;
            files::write_public(&out, &cert, force)?;
            println!("signed {identity}: {}", out.display());
        }
        Command::Inspect { file } => inspect(&file)?,
    }
    Ok(())
}

fn inspect(file: &Path) -> Result<()> {
    let pem = files::read_text(file, "a certificate")?;
    let info =
        peercam_certs::inspect_pem(&pem).with_context(|| format!("reading {}", file.display()))?;
    match &info.identity {
        Some(id) => {
            println!("role:        {}", id.role);
            println!("id:          {}", id.id);
        }
        None if info.is_ca => println!("role:        deployment CA"),
        None => println!("role:        none (not a peercam certificate)"),
    }
    println!("subject:     {}", info.subject);
    println!("issuer:      {}", info.issuer);
    println!("not before:  {}", format_time(info.not_before));
    println!("not after:   {}", format_time(info.not_after));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let state = if now > info.not_after {
        "EXPIRED"
    } else if now < info.not_before {
        "NOT YET VALID"
    } else {
        "valid"
    };
    println!("status:      {state}");
    for n in &info.dns_names {
        println!("dns:         {n}");
    }
    for ip in &info.ips {
        println!("ip:          {ip}");
    }
    println!("sha256:      {}", info.fingerprint);
    println!("key sha256:  {}", info.key_fingerprint);
    Ok(())
}

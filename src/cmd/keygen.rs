//! `dynamo keygen`: a new cluster secret, for `--cluster-key-file` (or `DYNAMO_CLUSTER_KEY`) on every role;
//! with `--sign`, the `mac` line a hand-written cluster-file entry needs in a keyed cluster.
use super::args::KeyArgs;
use crate::core::trust::ClusterKey;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the key to this file, readable by its owner only (it must not exist yet) [default: print it]
    #[arg(long, value_name = "PATH", conflicts_with = "sign")]
    pub out: Option<PathBuf>,

    /// Instead of a new key: print the `mac` of a cluster-file entry for this request address, signed with the
    /// cluster key (--cluster-key-file or DYNAMO_CLUSTER_KEY).
    #[arg(long, value_name = "ADDR")]
    pub sign: Option<String>,

    /// With --sign: the entry's namespace [default: none, an entry every namespace sees]
    #[arg(long, requires = "sign")]
    pub namespace: Option<String>,

    #[command(flatten)]
    pub key: KeyArgs,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    if let Some(address) = &args.sign {
        let key = args.key.key()?.ok_or_else(|| {
            anyhow::anyhow!("--sign needs the cluster key: pass --cluster-key-file PATH or set DYNAMO_CLUSTER_KEY")
        })?;
        let tag = crate::core::discovery::entry_tag(&key, address, args.namespace.as_deref());
        println!("mac = \"{tag}\"");
        return Ok(());
    }
    let key = ClusterKey::generate()?;
    let Some(path) = args.out else {
        println!("{}", key.to_hex());
        return Ok(());
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| {
        anyhow::anyhow!("cannot create {}: {e} (keygen never overwrites a key; remove the file first)", path.display())
    })?;
    writeln!(file, "{}", key.to_hex())?;
    eprintln!(
        "dynamo: wrote a new cluster key to {}; give every role of the cluster a copy (--cluster-key-file)",
        path.display()
    );
    Ok(())
}

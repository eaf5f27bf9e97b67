//! `dynamo keygen`: a new cluster secret, for `--cluster-key-file` (or `DYNAMO_CLUSTER_KEY`) on every role.
use crate::core::trust::ClusterKey;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the key to this file, readable by its owner only (it must not exist yet) [default: print it]
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
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

//! Compares two restores of one source tree with the tree walker of the
//! backup tests (`outpost_tests::trees::walk`): kind, mode, owner, group,
//! mtime, size, content, hard-link groups, devices, extended attributes,
//! ACLs and holes.
//!
//!   outpost-treediff SOURCE REFERENCE CANDIDATE
//!   outpost-treediff populate DIR SPARSE_MIB
//!
//! Prints what each restore lost of SOURCE, and exits 1 when CANDIDATE lost
//! something REFERENCE kept (the backup benchmark runs it with restic's
//! restore as REFERENCE and Outpost's as CANDIDATE). `populate` makes the
//! backup tests' tree of hard links, attributes, ACLs, special files and a
//! sparse file (`outpost_tests::trees::populate_fidelity`) in DIR.

use outpost_tests::trees::{lost, populate_fidelity, walk};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [populate, dir, mib] = args.as_slice()
        && populate == "populate"
        && let Ok(mib) = mib.parse()
    {
        populate_fidelity(Path::new(dir), mib);
        return ExitCode::SUCCESS;
    }
    let [source, reference, candidate] = args.as_slice() else {
        eprintln!("usage: outpost-treediff SOURCE REFERENCE CANDIDATE | populate DIR SPARSE_MIB");
        return ExitCode::from(64);
    };
    let source = walk(Path::new(source));
    let by_reference = lost(&source, &walk(Path::new(reference)));
    let by_candidate = lost(&source, &walk(Path::new(candidate)));
    println!("{} paths; the reference lost {}, the candidate {}", source.len(), by_reference.len(), by_candidate.len());
    for line in &by_reference {
        println!("reference lost: {line}");
    }
    for line in &by_candidate {
        println!("candidate lost: {line}");
    }
    // By path and field: what the candidate lost that the reference kept.
    let kept: BTreeSet<(&str, &str)> = by_reference.iter().map(|l| (l.path.as_str(), l.field)).collect();
    let worse: Vec<_> = by_candidate.iter().filter(|l| !kept.contains(&(l.path.as_str(), l.field))).collect();
    for line in &worse {
        println!("only the candidate lost: {line}");
    }
    if worse.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

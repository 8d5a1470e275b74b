//! The full workload against a mount with a recording replicator: every
//! recorded op must be valid, and the application-visible checks must hold.

mod common;

use common::*;
use std::sync::Arc;

#[test]
fn workload_runs_and_records_valid_ops() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("backing")).unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    let rec = Arc::new(Recorder::default());
    let m = mount(
        &dir.path().join("backing"),
        &dir.path().join("mnt"),
        rec.clone(),
    );
    workload::run(&m.mnt);
    m.unmount();
    assert!(rec.ops().len() > 5000);
}

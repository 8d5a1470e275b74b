//! Support for hapair's end-to-end tests: guards that clean up even when a
//! test panics (processes, FUSE mounts, network namespaces, temporary
//! directories), an independent tree comparator, the record format of the
//! crash-test writer, a harness that runs the real `hapair` binary, and a
//! hostile protocol client for bad-input tests.
//!
//! Everything here is test code: a failure panics with a message that says
//! what was being done, so the test that called it fails loudly.

pub mod cluster;
pub mod env;
pub mod fuse;
pub mod harness;
pub mod hostile;
pub mod netns;
pub mod proc;
pub mod records;
pub mod tmp;
pub mod treediff;
pub mod workload;

pub use env::{hapair_bin, require_root_and_fuse, tool_path};
pub use fuse::{mount_fstype, FuseMount};
pub use harness::{Harness, MountOpts};
pub use netns::{Netns, Veth};
pub use proc::Proc;
pub use records::{check_records, read_ack_log, CheckReport};
pub use tmp::TestDir;
pub use treediff::{tree_diff, tree_diff_with, DiffOptions, DiffReport};

//! What an attached VM keeps in the daemon's state directory, to outlive
//! the daemon: the description it attached with (a re-attach must bring
//! the same one) and a swap store per guest region (the pages reclaimed
//! from it). `state_dir/vms/vm<id>/`, removed when the VM detaches.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use faultline_attach::{AttachRequest, ATTACH_REATTACH};

use crate::memory::swap::{SwapCompression, SwapStore};

/// One VM's directory.
#[derive(Debug)]
pub struct VmState {
    dir: PathBuf,
}

/// Why a re-attach does not match what is on record.
#[derive(Debug, thiserror::Error)]
pub enum DescriptionMismatch {
    /// The VM attached with another description.
    #[error("vm {vm} attached with another description ({what})")]
    Differs {
        /// The VM.
        vm: u16,
        /// What differs.
        what: &'static str,
    },
    /// Nothing on record: the pages the VM's previous daemon evicted, if
    /// any, cannot be found, so serving it could hand the guest zeros.
    #[error(
        "no record of vm {vm} in {dir}: the state directory was lost or is not its daemon's (state_dir); pages it evicted could not be found"
    )]
    NoRecord {
        /// The VM.
        vm: u16,
        /// Where its record should be.
        dir: PathBuf,
    },
    /// The record cannot be read.
    #[error("vm {vm}'s record: {cause}")]
    Unreadable {
        /// The VM.
        vm: u16,
        /// Why.
        cause: std::io::Error,
    },
}

impl VmState {
    /// The directory of VM `vm_id` under `state_dir`: emptied for a fresh
    /// attach (what a VM of that id left is not this VM's), kept for a
    /// re-attach.
    pub fn open(state_dir: &Path, vm_id: u16, reattach: bool) -> std::io::Result<Self> {
        let dir = state_dir.join("vms").join(format!("vm{vm_id}"));
        if !reattach && dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Records `req` as the VM's description (a fresh attach).
    pub fn save_description(&self, req: &AttachRequest) -> std::io::Result<()> {
        let tmp = self.dir.join("attach.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&canonical(req))?;
        f.sync_all()?;
        std::fs::rename(tmp, self.dir.join("attach"))
    }

    /// Checks a re-attach's `req` against the description on record.
    pub fn check_description(&self, req: &AttachRequest) -> Result<(), DescriptionMismatch> {
        match std::fs::read(self.dir.join("attach")) {
            Ok(saved) if saved != canonical(req) => {
                let what = match AttachRequest::decode(&saved[faultline_attach::HEADER_LEN.min(saved.len())..]) {
                    Ok(s) if s.regions != req.regions => "its regions differ",
                    Ok(s) if s.memslots != req.memslots => "its memslots differ",
                    Ok(_) => "its vCPUs, IPA size or flags differ",
                    Err(_) => "the record is unreadable",
                };
                Err(DescriptionMismatch::Differs { vm: req.vm_id, what })
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(DescriptionMismatch::NoRecord { vm: req.vm_id, dir: self.dir.clone() })
            }
            Err(cause) => Err(DescriptionMismatch::Unreadable { vm: req.vm_id, cause }),
        }
    }

    /// The swap store of guest region `index` (`size` bytes): for a fresh
    /// attach created empty now, laid out as `compression` says; for a VM
    /// that comes back (`reattach`), the one a predecessor left, as it left
    /// it, read once the VM is this daemon's ([`SwapStore::deferred`]).
    pub fn swap_store(
        &self,
        index: usize,
        size: u64,
        compression: SwapCompression,
        reattach: bool,
    ) -> std::io::Result<SwapStore> {
        match reattach {
            true => Ok(SwapStore::deferred(&self.dir, index, size, compression)),
            false => SwapStore::in_dir(&self.dir, index, size, compression),
        }
    }

    /// Forgets the VM (it detached, and its stores are empty).
    pub fn remove(self) -> std::io::Result<()> {
        std::fs::remove_dir_all(&self.dir)
    }
}

/// The description as recorded: the encoded request without the
/// `REATTACH` flag.
fn canonical(req: &AttachRequest) -> Vec<u8> {
    AttachRequest { flags: req.flags & !ATTACH_REATTACH, ..req.clone() }.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_attach::MemslotDesc;

    fn request() -> AttachRequest {
        AttachRequest {
            vm_id: 3,
            nr_vcpus: 2,
            ipa_bits: 40,
            flags: 0,
            regions: Vec::new(),
            memslots: vec![MemslotDesc { gpa: 0x4000_0000, size: 4096, region: 0, flags: 0, region_offset: 0 }],
        }
    }

    #[test]
    fn a_reattach_must_bring_the_description_on_record() {
        let dir = tempfile::tempdir().unwrap();
        let st = VmState::open(dir.path(), 3, false).unwrap();
        st.save_description(&request()).unwrap();
        let store = st.swap_store(0, 1 << 20, SwapCompression::None, false).unwrap();
        assert_eq!(store.usage().unwrap().held, 0);
        assert!(dir.path().join("vms/vm3/region0.swap").exists());
        // The same VM comes back.
        let again = VmState::open(dir.path(), 3, true).unwrap();
        let reattach = AttachRequest { flags: ATTACH_REATTACH, ..request() };
        assert!(again.check_description(&reattach).is_ok());
        let mut other = request();
        other.memslots[0].size = 8192;
        let e = again.check_description(&other).unwrap_err();
        assert!(e.to_string().contains("memslots differ"), "{e}");
        // A fresh attach of the id starts over.
        let fresh = VmState::open(dir.path(), 3, false).unwrap();
        let e = fresh.check_description(&other).unwrap_err();
        assert!(matches!(e, DescriptionMismatch::NoRecord { vm: 3, .. }), "nothing on record: {e}");
        fresh.remove().unwrap();
        assert!(!dir.path().join("vms/vm3").exists());
    }
}

//! The core's fault engine for one VM: records outstanding faults, and
//! validates and executes the daemon's commands. It trusts nothing in a
//! command; every command gets a result record.

use crate::abort::{Abort, Access, DecodeError, FaultStatus};
use crate::addr::{Ipa, Pa, Range, PAGE_SIZE};
use crate::ownership::{Owner, OwnershipError, PageOwnership, VmId};
use crate::reject::Reject;
use crate::ring::abi::{
    action, kind, CommandRecord, FaultRecord, LeafRecord, Record, ResultRecord, FLAG_DEVICE, MAX_AGED_PAGES,
    MAX_OWNED_PAGES, MAX_VCPUS, NO_IPA,
};
use crate::ring::{Consumer, Producer, RingError};
use crate::stage2::{
    Geometry, LeafAttrs, MapOutcome, MapSize, MemType, Memcache, Perms, Stage2, TableError, TableMemory,
    TlbMaintenance, Walk,
};

/// A fault the core forwarded and the daemon has not answered yet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Outstanding {
    /// The fault id sent to the daemon.
    pub fault_id: u64,
    /// The faulting IPA, if known.
    pub ipa: Option<Ipa>,
    /// The decoded fault status.
    pub status: FaultStatus,
    /// The faulting access.
    pub access: Access,
    /// The record sent to the daemon, kept to send again if the daemon
    /// that took it never answered ([`Vm::repost`]).
    pub record: FaultRecord,
}

/// What the vCPU whose fault was answered does next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Completion {
    /// Return to the guest; it re-executes the access.
    Resume,
    /// Inject a synchronous external abort into the guest.
    InjectAbort,
    /// Exit to the VMM to emulate the access.
    ExitToVmm,
}

/// Why a fault could not be recorded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultError {
    /// The syndrome is not a lower-EL stage-2 abort.
    Decode(DecodeError),
    /// The vCPU index is out of range.
    BadVcpu(u32),
    /// The vCPU already has a fault outstanding.
    AlreadyOutstanding {
        /// The outstanding fault's id.
        fault_id: u64,
    },
}

/// Why a VM could not be created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmError {
    /// vCPU count zero or above the ABI maximum.
    BadVcpuCount(u32),
    /// The root pages are not the host's to give.
    RootNotOwned(OwnershipError),
    /// The root pages are misaligned or outside table memory.
    BadRoot,
    /// The VM id does not fit the 8-bit VMID that tags its TLB entries.
    VmidOutOfRange(VmId),
}

/// The result of one command, and the vCPU it completes (if any).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Executed {
    /// The result record for the daemon.
    pub result: ResultRecord,
    /// Set when the command finished the vCPU's outstanding fault.
    pub completion: Option<Completion>,
}

impl Executed {
    /// The reject reason, if the command was refused.
    pub fn rejected(&self) -> Option<Reject> {
        Reject::from_code(self.result.status)
    }
}

/// `ResultRecord::value` of a successful MAP.
pub mod map_outcome {
    /// A new leaf was written.
    pub const INSTALLED: u64 = 0;
    /// The same leaf was already there.
    pub const ALREADY_PRESENT: u64 = 1;
    /// The leaf's attributes were replaced (break-before-make).
    pub const REPLACED: u64 = 2;
    /// Permissions were relaxed in place (permission fault at the same granule).
    pub const RELAXED: u64 = 3;
}

/// One VM as the core sees it.
pub struct Vm<M: TableMemory> {
    id: VmId,
    stage2: Stage2<M>,
    memcache: Memcache,
    nr_vcpus: u32,
    outstanding: [Option<Outstanding>; MAX_VCPUS as usize],
    next_fault_id: u64,
    inval_seq: u64,
    access_flag_faults: u64,
}

/// What the core did with a stage-2 abort ([`Vm::handle_abort`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Taken {
    /// An access-flag fault on a mapped leaf: the core set the flag itself
    /// (KVM's `handle_access_fault()`), and the vCPU retries the access
    /// with no round trip to the daemon.
    Young,
    /// A fault for the daemon: send this record.
    Fault(FaultRecord),
}

impl<M: TableMemory> core::fmt::Debug for Vm<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("stage2", &self.stage2)
            .field("memcache", &self.memcache.len())
            .field("nr_vcpus", &self.nr_vcpus)
            .field("inval_seq", &self.inval_seq)
            .finish()
    }
}

/// A command that passed validation and ran: its result's `value` and
/// `detail` words, and how the vCPU's outstanding fault ends if the command
/// answered it.
#[derive(Clone, Copy, Debug)]
struct Done {
    value: u64,
    detail: u64,
    completion: Option<Completion>,
}

impl Done {
    /// A command that answers no fault.
    fn value(value: u64, detail: u64) -> Self {
        Self { value, detail, completion: None }
    }

    /// A command that ends the vCPU's fault with `completion`.
    fn answers(value: u64, detail: u64, completion: Completion) -> Self {
        Self { value, detail, completion: Some(completion) }
    }
}

/// A refused command: the reason and the result's `detail` word. Nothing
/// was changed.
#[derive(Clone, Copy, Debug)]
struct Refused {
    reason: Reject,
    detail: u64,
}

/// Refuses a command for `reason`.
fn refuse(reason: Reject, detail: u64) -> Refused {
    Refused { reason, detail }
}

type CmdResult = Result<Done, Refused>;

impl<M: TableMemory> Vm<M> {
    /// Creates a VM whose stage-2 root is at `root`; the root pages move from
    /// the host to the hypervisor. The VM id is also its VMID (VTCR_EL2.VS = 0:
    /// 8 bits), so ids above 255 are refused rather than aliased.
    pub fn new(
        id: VmId,
        geometry: Geometry,
        root: Pa,
        nr_vcpus: u32,
        mem: M,
        owners: &mut PageOwnership<'_>,
    ) -> Result<Self, VmError> {
        if nr_vcpus == 0 || nr_vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(nr_vcpus));
        }
        let vmid = u8::try_from(id.raw()).map_err(|_| VmError::VmidOutOfRange(id))?;
        let root_len = geometry.root_size();
        owners.check(root, root_len, Owner::Host).map_err(VmError::RootNotOwned)?;
        let stage2 = Stage2::new(geometry, root, vmid, mem).map_err(|_| VmError::BadRoot)?;
        owners.transfer(root, root_len, Owner::Host, Owner::Hyp).map_err(VmError::RootNotOwned)?;
        Ok(Self {
            id,
            stage2,
            memcache: Memcache::new(),
            nr_vcpus,
            outstanding: [None; MAX_VCPUS as usize],
            next_fault_id: 1,
            access_flag_faults: 0,
            inval_seq: 0,
        })
    }

    /// The VM id.
    pub fn id(&self) -> VmId {
        self.id
    }

    /// The stage-2 tables (read-only).
    pub fn stage2(&self) -> &Stage2<M> {
        &self.stage2
    }

    /// Pages in the memcache.
    pub fn memcache_len(&self) -> usize {
        self.memcache.len()
    }

    /// The invalidation sequence: bumped by every unmap and write-protect.
    pub fn inval_seq(&self) -> u64 {
        self.inval_seq
    }

    /// vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// The fault outstanding on `vcpu`, if any.
    pub fn outstanding(&self, vcpu: u32) -> Option<Outstanding> {
        self.outstanding.get(vcpu as usize).copied().flatten()
    }

    /// Handles a stage-2 abort on `vcpu`: an access-flag fault on a mapped
    /// leaf is resolved here, the flag set ([`Taken::Young`]; the daemon
    /// reads it back with AGE); anything else is recorded for the daemon
    /// ([`Vm::take_fault`]). An access-flag fault on a leaf another vCPU
    /// already made young is resolved too; one on nothing mapped (a race
    /// with an unmap) goes to the daemon.
    pub fn handle_abort(
        &mut self,
        vcpu: u32,
        esr: u64,
        far: u64,
        hpfar: u64,
        now_ns: u64,
        resolve: impl FnOnce(u64) -> Option<Ipa>,
    ) -> Result<Taken, FaultError> {
        let abort = self.admit(vcpu, esr, far, hpfar)?;
        if let (FaultStatus::AccessFlag { .. }, Some(ipa)) = (abort.status, abort.reported_ipa()) {
            if self.stage2.mark_young(ipa).is_ok() {
                self.access_flag_faults += 1;
                return Ok(Taken::Young);
            }
        }
        Ok(Taken::Fault(self.record(vcpu, &abort, far, hpfar, now_ns, resolve)))
    }

    /// Access-flag faults resolved at the core ([`Taken::Young`]).
    pub fn access_flag_faults(&self) -> u64 {
        self.access_flag_faults
    }

    /// Records a stage-2 abort on `vcpu` and returns the fault record to send.
    ///
    /// `resolve` translates FAR to an IPA when HPFAR_EL2 is not valid for the
    /// syndrome (AT S1E1R at EL2, a software stage-1 walk in the simulator).
    pub fn take_fault(
        &mut self,
        vcpu: u32,
        esr: u64,
        far: u64,
        hpfar: u64,
        now_ns: u64,
        resolve: impl FnOnce(u64) -> Option<Ipa>,
    ) -> Result<FaultRecord, FaultError> {
        let abort = self.admit(vcpu, esr, far, hpfar)?;
        Ok(self.record(vcpu, &abort, far, hpfar, now_ns, resolve))
    }

    /// An abort `vcpu` may take: a vCPU of this VM with no fault
    /// outstanding, and a syndrome that decodes.
    fn admit(&self, vcpu: u32, esr: u64, far: u64, hpfar: u64) -> Result<Abort, FaultError> {
        if vcpu >= self.nr_vcpus {
            return Err(FaultError::BadVcpu(vcpu));
        }
        if let Some(o) = self.outstanding[vcpu as usize] {
            return Err(FaultError::AlreadyOutstanding { fault_id: o.fault_id });
        }
        Abort::decode(esr, far, hpfar).map_err(FaultError::Decode)
    }

    /// Makes `abort` (decoded from its ESR with `far` and `hpfar`) `vcpu`'s
    /// outstanding fault and returns its record.
    fn record(
        &mut self,
        vcpu: u32,
        abort: &Abort,
        far: u64,
        hpfar: u64,
        now_ns: u64,
        resolve: impl FnOnce(u64) -> Option<Ipa>,
    ) -> FaultRecord {
        let ipa = abort.reported_ipa().or_else(|| abort.far.and_then(resolve));
        let fault_id = self.next_fault_id;
        self.next_fault_id += 1;
        let record = FaultRecord {
            kind: kind::FAULT,
            vcpu,
            fault_id,
            esr: abort.esr,
            far,
            hpfar,
            ipa: ipa.map_or(NO_IPA, Ipa::raw),
            inval_seq: self.inval_seq,
            timestamp_ns: now_ns,
        };
        self.outstanding[vcpu as usize] =
            Some(Outstanding { fault_id, ipa, status: abort.status, access: abort.stage2_access(), record });
        record
    }

    /// The record of `vcpu`'s outstanding fault, to send again: a daemon
    /// that re-attached after its predecessor died may never have seen it
    /// (the dead one popped it and never answered). The daemon drops a
    /// fault id it has already seen on the ring.
    pub fn repost(&self, vcpu: u32) -> Option<FaultRecord> {
        self.outstanding(vcpu).map(|o| o.record)
    }

    /// Validates and executes one command that arrived on `vcpu`'s command ring.
    pub fn execute(
        &mut self,
        vcpu: u32,
        record: &Record,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
    ) -> Executed {
        let cmd = CommandRecord::decode(record);
        let outcome = if vcpu >= self.nr_vcpus || cmd.reserved != 0 {
            Err(refuse(Reject::Malformed, 0))
        } else {
            match cmd.kind {
                kind::MAP => self.map(vcpu, &cmd, owners, tlb),
                kind::UNMAP => self.unmap(&cmd, owners, tlb),
                kind::WRITE_PROTECT => self.write_protect(&cmd, tlb),
                kind::COMPLETE => self.complete(vcpu, &cmd),
                kind::TOPUP => self.topup(&cmd, owners),
                kind::PREFAULT => self.prefault(&cmd, owners, tlb),
                kind::OWNED => self.owned(&cmd, owners),
                kind::AGE => self.age(&cmd),
                _ => Err(refuse(Reject::Malformed, 0)),
            }
        };
        self.finish(vcpu, &cmd, outcome)
    }

    /// Executes one command from the control ring `vcpu` (the ring pair
    /// after the vCPUs'): what [`Vm::execute`] does, and LEAVES, whose leaf
    /// records go to `results` before the caller pushes the result.
    pub fn execute_control(
        &mut self,
        vcpu: u32,
        record: &Record,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
        results: &mut Producer<'_>,
    ) -> Result<Executed, RingError> {
        let cmd = CommandRecord::decode(record);
        if cmd.kind != kind::LEAVES || vcpu >= self.nr_vcpus || cmd.reserved != 0 {
            return Ok(self.execute(vcpu, record, owners, tlb));
        }
        // Room for the leaves and, after them, the result.
        let room = results.view().capacity() - results.len()?;
        let outcome = self.leaves(&cmd, room.saturating_sub(1), results)?;
        Ok(self.finish(vcpu, &cmd, outcome))
    }

    /// The result of `cmd` from its outcome; ends the vCPU's fault if the
    /// command completed it.
    fn finish(&mut self, vcpu: u32, cmd: &CommandRecord, outcome: CmdResult) -> Executed {
        let (status, value, detail, completion) = match outcome {
            Ok(Done { value, detail, completion }) => (0, value, detail, completion),
            Err(Refused { reason: Reject::StaleSequence, detail }) if cmd.kind != kind::PREFAULT => {
                // KVM's -EAGAIN: the guest re-executes and faults afresh.
                (Reject::StaleSequence.code(), 0, detail, Some(Completion::Resume))
            }
            Err(Refused { reason, detail }) => (reason.code(), 0, detail, None),
        };
        // The one place a fault stops being outstanding: a command that
        // completes it (only commands naming the vCPU's outstanding fault
        // get this far with a completion).
        if completion.is_some() {
            let taken = self.take_outstanding(vcpu);
            debug_assert!(
                taken.is_some_and(|f| f.fault_id == cmd.fault_id),
                "completed a fault that was not outstanding"
            );
        }
        Executed {
            result: ResultRecord {
                kind: kind::RESULT,
                status,
                cmd_id: cmd.cmd_id,
                fault_id: cmd.fault_id,
                inval_seq: self.inval_seq,
                value,
                detail,
                command_kind: cmd.kind,
                reserved0: 0,
                reserved1: 0,
            },
            completion,
        }
    }

    /// Drains `vcpu`'s command ring, answering each command on its fault
    /// ring. Returns the completion of the vCPU's fault if a command gave one.
    pub fn serve(
        &mut self,
        vcpu: u32,
        commands: &mut Consumer<'_>,
        results: &mut Producer<'_>,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
    ) -> Result<Option<Completion>, RingError> {
        let mut completion = None;
        loop {
            // Never take a command we could not answer.
            if results.len()? == results.view().capacity() {
                return Ok(completion);
            }
            let Some(record) = commands.pop()? else {
                return Ok(completion);
            };
            let executed = self.execute(vcpu, &record, owners, tlb);
            results.push(&executed.result.encode())?;
            completion = completion.or(executed.completion);
        }
    }

    /// The outstanding fault of `vcpu` that a command naming `fault_id`
    /// answers; it stays outstanding until the command completes it.
    fn answered_fault(&self, vcpu: u32, fault_id: u64) -> Result<Outstanding, Refused> {
        match self.outstanding[vcpu as usize] {
            Some(o) if o.fault_id == fault_id => Ok(o),
            _ => Err(refuse(Reject::UnknownFault, 0)),
        }
    }

    /// Ends `vcpu`'s outstanding fault and returns it.
    fn take_outstanding(&mut self, vcpu: u32) -> Option<Outstanding> {
        self.outstanding[vcpu as usize].take()
    }

    fn map(
        &mut self,
        vcpu: u32,
        cmd: &CommandRecord,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
    ) -> CmdResult {
        let perms = Perms::from_bits(cmd.flags & !FLAG_DEVICE).ok_or(refuse(Reject::Malformed, 0))?;
        let fault = self.answered_fault(vcpu, cmd.fault_id)?;
        let (size, ipa, pa) = self.placement(cmd)?;
        let covers = |f: Ipa| Range::<Ipa>::new(ipa, cmd.size).is_some_and(|r| r.contains(f));
        if !fault.ipa.is_some_and(covers) {
            return Err(refuse(Reject::FaultOutsideRange, fault.ipa.map_or(NO_IPA, Ipa::raw)));
        }
        let attrs = self.grant(cmd, perms, fault.access, owners)?;
        let mem = attrs.mem;
        // A permission fault on a leaf of the same size and output: relax in place.
        if let FaultStatus::Permission { .. } = fault.status {
            if let Ok(Walk::Mapped { level, descriptor, .. }) = self.stage2.walk(ipa) {
                if level == size.level() && descriptor.output() == pa && descriptor.mem_type() == mem {
                    let level = self.stage2.relax(ipa, perms, tlb).map_err(|e| refuse(Reject::from(e), 0))?;
                    return Ok(Done::answers(map_outcome::RELAXED, level as u64, Completion::Resume));
                }
            }
        }
        let value = self.install(ipa, pa, size, attrs, tlb)?;
        Ok(Done::answers(value, size.level() as u64, Completion::Resume))
    }

    /// A mapping no fault waits for: every MAP check but the fault's, read
    /// access assumed (R required; X never on device memory), and nothing
    /// already mapped at the IPA is touched.
    fn prefault(
        &mut self,
        cmd: &CommandRecord,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
    ) -> CmdResult {
        if cmd.fault_id != 0 {
            return Err(refuse(Reject::Malformed, 0));
        }
        let perms = Perms::from_bits(cmd.flags & !FLAG_DEVICE).ok_or(refuse(Reject::Malformed, 0))?;
        let (size, ipa, pa) = self.placement(cmd)?;
        let attrs = self.grant(cmd, perms, Access::Read, owners)?;
        // Whatever is mapped there (a leaf of any size) stays as it is.
        if let Ok(Walk::Mapped { .. }) = self.stage2.walk(ipa) {
            return Ok(Done::value(map_outcome::ALREADY_PRESENT, 0));
        }
        let value = self.install(ipa, pa, size, attrs, tlb)?;
        Ok(Done::value(value, size.level() as u64))
    }

    /// Writes the leaf of a checked MAP or PREFAULT, if the memcache holds
    /// the worst-case table pages; the `map_outcome` value.
    fn install(
        &mut self,
        ipa: Ipa,
        pa: Pa,
        size: MapSize,
        attrs: LeafAttrs,
        tlb: &mut impl TlbMaintenance,
    ) -> Result<u64, Refused> {
        let need = self.stage2.worst_case_pages(size);
        if self.memcache.len() < need {
            return Err(refuse(Reject::MemcacheLow, need as u64));
        }
        let outcome = self
            .stage2
            .map(ipa, pa, size, attrs, &mut self.memcache, tlb)
            .map_err(|e| refuse(Reject::from(e), table_detail(e)))?;
        Ok(match outcome {
            MapOutcome::Installed => map_outcome::INSTALLED,
            MapOutcome::AlreadyPresent => map_outcome::ALREADY_PRESENT,
            MapOutcome::Replaced => map_outcome::REPLACED,
        })
    }

    /// Where a MAP or PREFAULT puts its leaf: a leaf size of the geometry,
    /// IPA and PA aligned to it and inside their spaces.
    fn placement(&self, cmd: &CommandRecord) -> Result<(MapSize, Ipa, Pa), Refused> {
        let size = MapSize::from_bytes(cmd.size).ok_or(refuse(Reject::BadSize, cmd.size))?;
        let (ipa, pa) = (Ipa::new(cmd.ipa), Pa::new(cmd.pa));
        if !ipa.is_aligned(cmd.size) || !pa.is_aligned(cmd.size) {
            return Err(refuse(Reject::Misaligned, 0));
        }
        let geometry = *self.stage2.geometry();
        if !geometry.ipa_range_fits(ipa, cmd.size) {
            return Err(refuse(Reject::IpaOutOfRange, 0));
        }
        if !geometry.pa_range_fits(pa, cmd.size) {
            return Err(refuse(Reject::PaOutOfRange, 0));
        }
        if size.level() < geometry.start_level() {
            return Err(refuse(Reject::SizeUnsupported, 0));
        }
        Ok((size, ipa, pa))
    }

    /// What a MAP or PREFAULT may grant: permissions legal for `access`
    /// and the memory type, the current sequence, pages this VM owns.
    fn grant(
        &self,
        cmd: &CommandRecord,
        perms: Perms,
        access: Access,
        owners: &PageOwnership<'_>,
    ) -> Result<LeafAttrs, Refused> {
        let mem = if cmd.flags & FLAG_DEVICE != 0 { MemType::Device } else { MemType::Normal };
        if !legal_perms(perms, mem, access) {
            return Err(refuse(Reject::BadPermissions, perms.bits() as u64));
        }
        if cmd.inval_seq != self.inval_seq {
            return Err(refuse(Reject::StaleSequence, self.inval_seq));
        }
        match owners.check(Pa::new(cmd.pa), cmd.size, Owner::Vm(self.id)) {
            Ok(()) => Ok(LeafAttrs { perms, mem }),
            Err(OwnershipError::WrongOwner { pa, .. } | OwnershipError::Untracked { pa }) => {
                Err(refuse(Reject::NotOwned, pa.raw()))
            }
            Err(OwnershipError::BadRange) => Err(refuse(Reject::Misaligned, 0)),
        }
    }

    fn range_of(cmd: &CommandRecord) -> Result<Range<Ipa>, Refused> {
        if cmd.flags != 0 || cmd.fault_id != 0 || cmd.pa != 0 || cmd.inval_seq != 0 {
            return Err(refuse(Reject::Malformed, 0));
        }
        let range = Range::<Ipa>::new(Ipa::new(cmd.ipa), cmd.size).ok_or(refuse(Reject::BadRange, 0))?;
        if !range.start().is_aligned(PAGE_SIZE) || range.len() % PAGE_SIZE != 0 {
            return Err(refuse(Reject::BadRange, 0));
        }
        Ok(range)
    }

    fn unmap(
        &mut self,
        cmd: &CommandRecord,
        owners: &mut PageOwnership<'_>,
        tlb: &mut impl TlbMaintenance,
    ) -> CmdResult {
        let range = Self::range_of(cmd)?;
        let memcache = &mut self.memcache;
        let stats = self
            .stage2
            .unmap(range, tlb, &mut |page| {
                if memcache.push(page).is_err() {
                    // The memcache is full: the page goes back to the host.
                    // Every freed table page came from the memcache, which
                    // holds only pages TOPUP moved from the host to the
                    // hypervisor, so the transfer cannot fail.
                    let returned = owners.transfer(page, PAGE_SIZE, Owner::Hyp, Owner::Host);
                    debug_assert_eq!(returned, Ok(()), "a freed table page was not the hypervisor's");
                }
            })
            .map_err(|e| refuse(Reject::from(e), table_detail(e)))?;
        self.inval_seq += 1;
        Ok(Done::value(stats.leaves, stats.tables_freed))
    }

    fn write_protect(&mut self, cmd: &CommandRecord, tlb: &mut impl TlbMaintenance) -> CmdResult {
        let range = Self::range_of(cmd)?;
        let changed = self.stage2.write_protect(range, tlb).map_err(|e| refuse(Reject::from(e), 0))?;
        self.inval_seq += 1;
        Ok(Done::value(changed, 0))
    }

    fn complete(&mut self, vcpu: u32, cmd: &CommandRecord) -> CmdResult {
        if cmd.ipa != 0 || cmd.pa != 0 || cmd.size != 0 || cmd.inval_seq != 0 {
            return Err(refuse(Reject::Malformed, 0));
        }
        self.answered_fault(vcpu, cmd.fault_id)?;
        let completion = match cmd.flags {
            action::RETRY => Completion::Resume,
            action::INJECT_ABORT => Completion::InjectAbort,
            action::EXIT_TO_VMM => Completion::ExitToVmm,
            other => return Err(refuse(Reject::BadAction, other as u64)),
        };
        Ok(Done::answers(cmd.flags as u64, 0, completion))
    }

    fn topup(&mut self, cmd: &CommandRecord, owners: &mut PageOwnership<'_>) -> CmdResult {
        if cmd.flags != 0 || cmd.fault_id != 0 || cmd.ipa != 0 || cmd.inval_seq != 0 {
            return Err(refuse(Reject::Malformed, 0));
        }
        let pa = Pa::new(cmd.pa);
        if cmd.size == 0 || cmd.size % PAGE_SIZE != 0 || !pa.is_aligned(PAGE_SIZE) || pa.checked_add(cmd.size).is_none()
        {
            return Err(refuse(Reject::BadRange, 0));
        }
        let pages = cmd.size / PAGE_SIZE;
        if pages > self.memcache.room() as u64 {
            return Err(refuse(Reject::MemcacheFull, self.memcache.room() as u64));
        }
        for i in 0..pages {
            let page = Pa::new(pa.raw() + i * PAGE_SIZE);
            if self.stage2.memory().table(page).is_none() {
                return Err(refuse(Reject::NotTableMemory, page.raw()));
            }
        }
        match owners.transfer(pa, cmd.size, Owner::Host, Owner::Hyp) {
            Ok(()) => {}
            Err(OwnershipError::WrongOwner { pa, .. } | OwnershipError::Untracked { pa }) => {
                return Err(refuse(Reject::NotOwned, pa.raw()))
            }
            Err(OwnershipError::BadRange) => return Err(refuse(Reject::BadRange, 0)),
        }
        for i in 0..pages {
            // Room was checked above; a failure here is impossible.
            let pushed = self.memcache.push(Pa::new(pa.raw() + i * PAGE_SIZE));
            debug_assert!(pushed.is_ok(), "the memcache's room was checked");
        }
        Ok(Done::value(self.memcache.len() as u64, pages))
    }

    /// OWNED: bit i of the value says page i of `[pa, pa + size)` belongs
    /// to the hypervisor (a table page or in the memcache); the detail is
    /// the pages asked about. A restarted daemon learns from it which
    /// table-pool pages it must not hand over again.
    fn owned(&self, cmd: &CommandRecord, owners: &PageOwnership<'_>) -> CmdResult {
        if cmd.flags != 0 || cmd.fault_id != 0 || cmd.ipa != 0 || cmd.inval_seq != 0 {
            return Err(refuse(Reject::Malformed, 0));
        }
        let (pa, pages) = (Pa::new(cmd.pa), cmd.size / PAGE_SIZE);
        if cmd.size % PAGE_SIZE != 0 || pages == 0 || pages > MAX_OWNED_PAGES || !pa.is_aligned(PAGE_SIZE) {
            return Err(refuse(Reject::BadRange, 0));
        }
        let mut bits = 0u64;
        for i in 0..pages {
            let page = pa.checked_add(i * PAGE_SIZE).ok_or(refuse(Reject::BadRange, 0))?;
            if owners.owner(page) == Some(Owner::Hyp) {
                bits |= 1 << i;
            }
        }
        Ok(Done::value(bits, pages))
    }

    /// AGE: clears the access flag over the range (at most
    /// [`MAX_AGED_PAGES`] pages); the value is a bitmap, bit i set if page
    /// `ipa + i * 4096` was mapped by a leaf whose flag was set (every page
    /// of a young block in the range), the detail the leaves cleared.
    fn age(&mut self, cmd: &CommandRecord) -> CmdResult {
        let range = Self::range_of(cmd)?;
        let pages = range.len() / PAGE_SIZE;
        if pages == 0 || pages > MAX_AGED_PAGES {
            return Err(refuse(Reject::BadRange, MAX_AGED_PAGES));
        }
        let (start, end) = (range.start().raw(), range.end().raw());
        let mut bits = 0u64;
        let cleared = self
            .stage2
            .test_clear_young(range, &mut |ipa, level| {
                let leaf_end = ipa.raw().saturating_add(Geometry::level_size(level));
                let (from, to) = (ipa.raw().max(start), leaf_end.min(end));
                for page in (from..to).step_by(PAGE_SIZE as usize) {
                    bits |= 1 << ((page - start) / PAGE_SIZE);
                }
            })
            .map_err(|e| refuse(Reject::from(e), 0))?;
        Ok(Done::value(bits, cleared))
    }

    /// LEAVES: up to `max` leaves overlapping `[ipa, ipa + size)`, in IPA
    /// order, as leaf records on `results`; the value is the leaves sent,
    /// the detail the IPA to ask from next (the range's end once done).
    fn leaves(&self, cmd: &CommandRecord, max: u32, results: &mut Producer<'_>) -> Result<CmdResult, RingError> {
        let range = match Self::range_of(cmd) {
            Ok(range) => range,
            Err(refused) => return Ok(Err(refused)),
        };
        // Leaves that continue the pending run join it; any other sends it.
        let (mut sent, mut next, mut pushed, mut stopped) = (0u32, range.end().raw(), Ok(()), false);
        let mut pending: Option<LeafRecord> = None;
        let walked = self.stage2.leaves_in(range, &mut |ipa, level, d| {
            let size = MapSize::from_level(level).map_or(PAGE_SIZE, MapSize::bytes);
            let device = if d.mem_type() == MemType::Device { FLAG_DEVICE } else { 0 };
            let flags = d.perms().bits() | device;
            if let Some(run) = pending.as_mut() {
                let span = run.count * run.size;
                if run.flags == flags
                    && run.size == size
                    && run.ipa + span == ipa.raw()
                    && run.pa + span == d.output().raw()
                {
                    run.count += 1;
                    return true;
                }
                if sent == max {
                    (next, stopped) = (run.ipa, true);
                    return false;
                }
                pushed = results.push(&run.encode());
                sent += 1;
                if pushed.is_err() {
                    return false;
                }
            }
            pending = Some(LeafRecord {
                kind: kind::LEAF,
                flags,
                cmd_id: cmd.cmd_id,
                ipa: ipa.raw(),
                pa: d.output().raw(),
                size,
                count: 1,
                reserved: [0; 2],
            });
            true
        });
        pushed?;
        if let (false, Some(run)) = (stopped, pending) {
            if sent == max {
                next = run.ipa;
            } else {
                results.push(&run.encode())?;
                sent += 1;
            }
        }
        Ok(walked.map(|()| Done::value(sent as u64, next)).map_err(|e| refuse(Reject::from(e), 0)))
    }
}

/// Legal stage-2 permissions for a map answering a fault with `access`:
/// readable, exec never on device memory, and granting the faulting access.
fn legal_perms(perms: Perms, mem: MemType, access: Access) -> bool {
    let grants = match access {
        Access::Read => perms.read(),
        Access::Write => perms.write(),
        Access::Execute => perms.exec(),
    };
    perms.read() && !(mem == MemType::Device && perms.exec()) && grants
}

fn table_detail(e: TableError) -> u64 {
    match e {
        TableError::MemcacheLow { need, .. } => need as u64,
        TableError::Overlap { level } => level as u64,
        TableError::PartialBlock { block } => block.raw(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
